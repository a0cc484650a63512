"""Pi-model (Laine & Aila, "Temporal ensembling for semi-supervised learning", ICLR 2017): a
semi-supervised baseline of the USCL paper's Table 3.

    sampler   medcl.sampling.labeled_unlabeled: per step B labeled frames (one weak view; a frame's
              label is its video's, data.label_fraction of the videos) and mu * B unlabeled frames,
              each with TWO independent weak augmentations (the stochastic passes), mu = 7
    f, h      ResNet-18 backbone (exported) and linear classifier: one forward pass over all views
    L = CE(h(f(x_l)), y) + w(t) * mean (softmax(h(f(u'))) - softmax(h(f(u''))))^2
    w(t) = w_max * exp(-5 (1 - t)^2), t = steps done / (rampup_epochs * steps per epoch) <= 1,
          w_max = 100, rampup_epochs = 80                              (losses/consistency.py)
The gradient flows through both passes (as in the paper). The paper averages CE over the whole
minibatch (so it scales w_max by labeled / all); CE here is a mean over the labeled frames, which
absorbs that factor. ``steps_done`` is a buffer: checkpoints hold the ramp-up position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medcl.config import Config
from medcl.losses.consistency import ConsistencyMSE, gaussian_rampup
from medcl.methods.supervised import Supervised


class PiModel(Supervised):
    name = "pimodel"
    unlabeled_views = ("weak", "weak")

    def __init__(self, classes: list[str], *, in_channels: int = 1, consistency_weight: float = 100.0,
                 rampup_steps: int = 0, backbone: str = "resnet18") -> None:
        super().__init__(classes, in_channels=in_channels, backbone=backbone)
        self.consistency = ConsistencyMSE()
        self.consistency_weight, self.rampup_steps = consistency_weight, rampup_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def ramp(self) -> float:
        """exp(-5 (1 - t)^2) for the update being computed (1 without ramp-up)."""
        return gaussian_rampup(int(self.steps_done) / self.rampup_steps) if self.rampup_steps else 1.0

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        logits_labeled, *logits_unlabeled = self.classify(batch["labeled"], *batch["unlabeled"])
        loss_sup = self.criterion(logits_labeled, batch["label"])
        loss_consistency = self.consistency_term(logits_unlabeled, batch)
        weight = self.consistency_weight * self.ramp()
        self.steps_done += 1
        return {"loss": loss_sup + weight * loss_consistency, "loss_sup": loss_sup.detach(),
                "loss_consistency": loss_consistency.detach(),
                "consistency_weight": torch.tensor(weight, device=loss_sup.device)}

    def consistency_term(self, logits_unlabeled: list[Tensor], batch: dict[str, Any]) -> Tensor:
        first, second = logits_unlabeled
        return self.consistency(first, second.float().softmax(1))


def rampup_steps(config: Config, loader) -> int:
    """``rampup_epochs`` of the method's section in updates."""
    return round(config.params.rampup_epochs * len(loader))


def build(config: Config, *, rank: int = 0, world_size: int = 1):
    from medcl.sampling.labeled_unlabeled import labeled_unlabeled_loader

    p = config.params
    loader, _, classes = labeled_unlabeled_loader(config, mu=p.mu, views=PiModel.unlabeled_views, rank=rank,
                                                  world_size=world_size)
    method = PiModel(classes, in_channels=config.data.in_channels, consistency_weight=p.consistency_weight,
                     rampup_steps=rampup_steps(config, loader), backbone=config.model.backbone)
    return method, loader
