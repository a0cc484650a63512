"""Plain supervised pretraining on the labeled videos (the USCL paper's "US-4 supervised" baseline).

    sampler   medcl.sampling.pairs over LABELED videos only (data.label_fraction of them):
              each step sees two augmented views per video (preset: pairing=video, mixup=none)
    f, h      ResNet-18 backbone (exported) and linear classifier
    L = cross-entropy(h(f(views)), video label)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medcl.config import Config
from medcl.losses.masked_ce import MaskedCrossEntropy
from medcl.methods.base import Method
from medcl.models.backbones import build_backbone, feature_dim
from medcl.models.heads import LinearClassifier


class Supervised(Method):
    name = "supervised"

    def __init__(self, classes: list[str], *, in_channels: int = 1, label_smoothing: float = 0.0,
                 backbone: str = "resnet18") -> None:
        super().__init__()
        if not classes:
            raise ValueError(f"{self.name} pretraining needs at least one class")
        self.backbone_spec = {"name": backbone, "kwargs": {"in_channels": in_channels}}
        self.backbone = build_backbone(backbone, in_channels=in_channels)
        features = feature_dim(self.backbone, in_channels)  # 512 for ResNet-18
        self.classifier = LinearClassifier(features, len(classes))
        self.criterion = MaskedCrossEntropy(label_smoothing)
        self.metadata = {"classes": list(classes)}

    def classify(self, *views: Tensor) -> tuple[Tensor, ...]:
        """h(f(x)) of each view, from ONE forward pass over all of them (one BatchNorm batch); the
        semi-supervised methods (FixMatch, Pi-model, Temporal Ensembling) build on this."""
        return self.classifier(self.backbone(torch.cat(views))).split([len(v) for v in views])

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        logits = torch.cat(self.classify(batch["view1"], batch["view2"]))
        labels = torch.cat([batch["label"], batch["label"]])
        loss = self.criterion(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "train_accuracy": accuracy.detach()}


def build(config: Config, *, rank: int = 0, world_size: int = 1):
    from medcl.sampling.pairs import frame_set_loader

    loader, _, classes = frame_set_loader(config, rank=rank, world_size=world_size, labeled_only=True)
    method = Supervised(classes, in_channels=config.data.in_channels, label_smoothing=config.params.label_smoothing,
                        backbone=config.model.backbone)
    return method, loader
