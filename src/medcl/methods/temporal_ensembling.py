"""Temporal Ensembling (Laine & Aila, ICLR 2017): a semi-supervised baseline of the USCL paper's Table 3.

    sampler   as the Pi-model's (medcl.sampling.labeled_unlabeled) but ONE weak view per unlabeled
              frame; ``item`` = the frame's index, each frame once per epoch
    f, h      ResNet-18 backbone (exported) and linear classifier
    L = CE(h(f(x_l)), y) + w(t) * mean over frames with a target of (softmax(h(f(u))) - z~)^2,
          w as the Pi-model's with w_max = 30 (methods/pimodel.py)
    Z_i <- alpha Z_i + (1 - alpha) softmax(h(f(u_i))),  z~_i = Z_i / (1 - alpha^n_i),   alpha = 0.6
where n_i counts frame i's updates (startup bias correction). The paper updates Z once per epoch
from that epoch's predictions; each frame being seen once per epoch, updating Z_i right after the
frame's step (its target computed before) gives the same targets. A frame never seen has no
target (the paper's zero target under a near-zero weight) and is left out of the mean.
``ensemble`` [frames, classes] and ``ensemble_updates`` [frames] are buffers, so checkpoints
hold them (exact resume); under DDP the predictions and frame indices of all ranks are
all-gathered, so every rank updates the whole ensemble identically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medcl.config import Config
from medcl.distributed import gather_no_grad
from medcl.methods.pimodel import PiModel, rampup_steps


class TemporalEnsembling(PiModel):
    name = "temporal_ensembling"
    unlabeled_views = ("weak",)

    def __init__(self, classes: list[str], n_items: int, *, in_channels: int = 1, alpha: float = 0.6,
                 consistency_weight: float = 30.0, rampup_steps: int = 0, backbone: str = "resnet18") -> None:
        super().__init__(classes, in_channels=in_channels, consistency_weight=consistency_weight,
                         rampup_steps=rampup_steps, backbone=backbone)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self.register_buffer("ensemble", torch.zeros(n_items, len(classes)))
        self.register_buffer("ensemble_updates", torch.zeros(n_items, dtype=torch.long))

    def consistency_term(self, logits_unlabeled: list[Tensor], batch: dict[str, Any]) -> Tensor:
        (logits,) = logits_unlabeled
        items = batch["item"]
        updates = self.ensemble_updates[items]
        correction = 1.0 - torch.pow(self.alpha, updates.double()).float()
        target = self.ensemble[items] / correction.clamp_min(1e-12)[:, None]
        loss = self.consistency(logits, target, valid=updates > 0)
        self.accumulate(items, logits.detach().float().softmax(1))
        return loss

    @torch.no_grad()
    def accumulate(self, items: Tensor, probs: Tensor) -> None:
        """Z_i <- alpha Z_i + (1 - alpha) p_i for the frames of every rank's batch."""
        items, probs = gather_no_grad(items), gather_no_grad(probs)
        self.ensemble[items] = self.alpha * self.ensemble[items] + (1.0 - self.alpha) * probs
        self.ensemble_updates[items] += 1


def build(config: Config, *, rank: int = 0, world_size: int = 1):
    from medcl.sampling.labeled_unlabeled import labeled_unlabeled_loader

    p = config.params
    loader, batches, classes = labeled_unlabeled_loader(config, mu=p.mu, views=TemporalEnsembling.unlabeled_views,
                                                        rank=rank, world_size=world_size)
    method = TemporalEnsembling(classes, batches.n_items, in_channels=config.data.in_channels, alpha=p.alpha,
                                consistency_weight=p.consistency_weight, rampup_steps=rampup_steps(config, loader),
                                backbone=config.model.backbone)
    return method, loader
