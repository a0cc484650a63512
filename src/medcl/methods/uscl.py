"""USCL: semi-supervised video contrastive pretraining (Chen et al., MICCAI 2021).

    sampler   medcl.sampling.pairs (I1: one positive pair per video per batch; I2: Beta mixing)
    f         ResNet-18 backbone (exported)             r = f(x)
    g         projection head, 2-layer MLP, 256 out     z = g(r)
    h         linear classifier                          logits = h(r)
    L = L_con(z_1, z_2) + lambda_sup * L_sup(h(r), y)   (L_sup on labeled views only)

``uscl.label_aware: true`` replaces NT-Xent with the SupCon-style loss (known different labels
negatives, same labels positives). Both views go through f in ONE forward pass of 2N images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medcl.config import Config
from medcl.losses.masked_ce import MaskedCrossEntropy
from medcl.losses.ntxent import NTXentLoss
from medcl.losses.supcon import SupConLoss
from medcl.methods.base import Method
from medcl.models.backbones import build_backbone, feature_dim
from medcl.models.heads import LinearClassifier, ProjectionHead
from medcl.distributed import is_distributed


class USCL(Method):
    name = "uscl"

    def __init__(
        self,
        classes: list[str],
        *,
        in_channels: int = 1,
        temperature: float = 0.5,
        lambda_sup: float = 0.2,
        label_aware: bool = False,
        proj_hidden: int = 512,
        proj_dim: int = 256,
        backbone: str = "resnet18",
    ) -> None:
        super().__init__()
        self.backbone_spec = {"name": backbone, "kwargs": {"in_channels": in_channels}}
        self.backbone = build_backbone(backbone, in_channels=in_channels)
        features = feature_dim(self.backbone, in_channels)  # 512 for ResNet-18
        self.projection = ProjectionHead(features, proj_hidden, proj_dim)
        self.classifier = LinearClassifier(features, len(classes)) if classes else None
        gather = is_distributed()
        self.contrast = (SupConLoss if label_aware else NTXentLoss)(temperature, gather_distributed=gather)
        self.label_aware = label_aware
        self.supervised = MaskedCrossEntropy()
        self.lambda_sup = lambda_sup
        self.metadata = {"classes": list(classes)}

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        n = batch["view1"].shape[0]
        features = self.backbone(torch.cat([batch["view1"], batch["view2"]]))
        z = self.projection(features)
        labels = batch["label"]
        if self.label_aware:
            loss_con = self.contrast(z[:n], z[n:], labels)
        else:
            loss_con = self.contrast(z[:n], z[n:])
        if self.classifier is None:
            loss_sup = features.sum() * 0.0 + 0.0
        else:
            loss_sup = self.supervised(self.classifier(features), torch.cat([labels, labels]))
        loss = loss_con + self.lambda_sup * loss_sup
        return {"loss": loss, "loss_con": loss_con.detach(), "loss_sup": loss_sup.detach(),
                "labeled_fraction": (labels >= 0).float().mean()}


def build(config: Config, *, rank: int = 0, world_size: int = 1):
    from medcl.sampling.pairs import frame_set_loader

    loader, _, classes = frame_set_loader(config, rank=rank, world_size=world_size)
    return from_config(config, classes), loader


def from_config(config: Config, classes: list[str]) -> USCL:
    """The USCL a config describes (its ``model`` / ``data`` sections and USCL's terms in ``config.params``:
    the ``uscl:`` section, or ``joint:``, which extends it)."""
    p = config.params
    return USCL(classes, in_channels=config.data.in_channels, temperature=p.temperature, lambda_sup=p.lambda_sup,
                label_aware=p.label_aware, proj_hidden=config.model.proj_hidden, proj_dim=config.model.proj_dim,
                backbone=config.model.backbone)
