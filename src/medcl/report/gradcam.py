"""Grad-CAM of a backbone's last convolutional stage, and backbone features for embeddings.

Grad-CAM (Selvaraju et al., ICCV 2017) needs a class score. A pretrained backbone has no
classifier, so :class:`PrototypeClassifier` scores a frame by the cosine similarity of its
features to each class's mean feature (computed on the report's sample frames): the map then
shows which regions make the frame look like its class *to this backbone*. The same scoring
serves every run, so maps of scratch / SimCLR / USCL backbones are comparable side by side
(as in USCL's Fig. 4). The maps come from MONAI's :class:`monai.visualize.GradCAM` on
``layer4`` of the ResNet-18.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medcl.precision import autocast, resolve_precision


@torch.no_grad()
def backbone_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 32,
                      precision: str = "auto") -> np.ndarray:
    """Pooled backbone features [n, D] (eval mode, no gradients; bf16 autocast where native, as in
    fine-tuning: :mod:`medcl.precision`)."""
    was_training = backbone.training
    backbone.eval()
    with autocast(images.device, resolve_precision(precision, images.device)):
        out = [backbone(images[i : i + batch_size]).float().flatten(1) for i in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return torch.cat(out).cpu().numpy()


class PrototypeClassifier(nn.Module):
    """Scores = cosine(features, class prototype) / temperature; differentiable for Grad-CAM."""

    def __init__(self, backbone: nn.Module, prototypes: torch.Tensor, temperature: float = 0.1):
        super().__init__()
        if prototypes.ndim != 2:
            raise ValueError(f"prototypes must be [n_classes, D], got {tuple(prototypes.shape)}")
        self.backbone = backbone
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=1))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.backbone(x).flatten(1), dim=1)
        return features @ self.prototypes.T / self.temperature

    @classmethod
    def from_features(cls, backbone: nn.Module, features: np.ndarray, labels: Sequence[str], classes: Sequence[str]) -> PrototypeClassifier:
        labels = np.asarray(labels)
        missing = [c for c in classes if not (labels == c).any()]
        if missing:
            raise ValueError(f"no sample frames of class(es) {missing} to build prototypes from")
        prototypes = np.stack([features[labels == c].mean(axis=0) for c in classes])
        return cls(backbone, torch.as_tensor(prototypes))


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Per-map scaling to [0, 1]; a flat map stays 0 (MONAI's default flips min and max)."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *[1] * (x.ndim - 1))
    hi = flat.max(dim=1).values.view(-1, *[1] * (x.ndim - 1))
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(x))


def target_layer_name(model: nn.Module) -> str | None:
    """The last convolutional stage: ``backbone.layer4`` for a ResNet, else None."""
    names = dict(model.named_modules())
    for name in ("backbone.layer4", "layer4"):
        if name in names:
            return name
    return None


def gradcam_maps(model: nn.Module, images: torch.Tensor, class_idx: Sequence[int] | None = None, target_layer: str | None = None) -> np.ndarray:
    """Grad-CAM maps [n, H, W] in [0, 1] at the input resolution, one per image.

    ``class_idx`` is the class whose score is explained for each image (default: the predicted one).
    """
    from monai.visualize import GradCAM

    target_layer = target_layer or target_layer_name(model)
    if target_layer is None:
        raise ValueError(f"{type(model).__name__} has no 'layer4' stage for Grad-CAM")
    model.eval()
    cam = GradCAM(nn_module=model, target_layers=target_layer, postprocessing=_min_max)
    maps = torch.zeros(len(images), *images.shape[2:])
    with torch.enable_grad():
        if class_idx is None:
            for i in range(len(images)):  # each image explains its own predicted class
                maps[i] = cam(images[i : i + 1])[0, 0].detach().cpu()
        else:
            # one backward pass per class: MONAI scores a whole batch with one class index; in eval
            # mode every image's map depends on that image alone, so batching changes nothing
            targets = torch.as_tensor([int(c) for c in class_idx])
            for target in targets.unique().tolist():
                rows = (targets == target).nonzero().flatten()
                maps[rows] = cam(images[rows], class_idx=int(target))[:, 0].detach().cpu()
    return maps.numpy()
