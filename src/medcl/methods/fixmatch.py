"""FixMatch (Sohn et al., NeurIPS 2020): a semi-supervised baseline of the USCL paper's Table 3.

    sampler   medcl.sampling.labeled_unlabeled: per step B labeled frames (weak view; a frame's
              label is its video's, data.label_fraction of the videos) and mu * B unlabeled frames
              (a weak and a strong view: medcl.sampling.augment.strong_augment_frames), mu = 7
    f, h      ResNet-18 backbone (exported) and linear classifier: one forward pass over all views
    L = CE(h(f(x_l)), y) + lambda_u * L_u,   lambda_u = 1
    L_u = mean over unlabeled of 1[max p_w >= 0.95] CE(argmax p_w, h(f(strong))),
          p_w = softmax(h(f(weak))), no gradient through p_w          (losses/pseudo_label.py)
Logged: ``mask_rate`` (share of unlabeled frames whose pseudo-label passed the threshold).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from medcl.config import Config
from medcl.losses.pseudo_label import PseudoLabelLoss
from medcl.methods.supervised import Supervised


class FixMatch(Supervised):
    name = "fixmatch"

    def __init__(self, classes: list[str], *, in_channels: int = 1, threshold: float = 0.95, lambda_u: float = 1.0,
                 backbone: str = "resnet18") -> None:
        super().__init__(classes, in_channels=in_channels, backbone=backbone)
        self.unlabeled_loss = PseudoLabelLoss(threshold)
        self.lambda_u = lambda_u

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        weak, strong = batch["unlabeled"]
        logits_labeled, logits_weak, logits_strong = self.classify(batch["labeled"], weak, strong)
        loss_sup = self.criterion(logits_labeled, batch["label"])
        loss_unlabeled, mask = self.unlabeled_loss(logits_weak, logits_strong)
        return {"loss": loss_sup + self.lambda_u * loss_unlabeled, "loss_sup": loss_sup.detach(),
                "loss_unlabeled": loss_unlabeled.detach(), "mask_rate": mask.mean()}


def build(config: Config, *, rank: int = 0, world_size: int = 1):
    from medcl.sampling.augment import StrongAugmentParams
    from medcl.sampling.labeled_unlabeled import labeled_unlabeled_loader

    p = config.params
    strong = StrongAugmentParams(ops=p.randaugment_ops, cutout=p.cutout)
    loader, _, classes = labeled_unlabeled_loader(config, mu=p.mu, views=("weak", "strong"), strong=strong,
                                                  rank=rank, world_size=world_size)
    method = FixMatch(classes, in_channels=config.data.in_channels, threshold=p.threshold, lambda_u=p.lambda_u,
                      backbone=config.model.backbone)
    return method, loader
