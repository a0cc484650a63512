"""SimCLR (Chen et al., ICML 2020) on ultrasound frames: the USCL paper's self-supervised baseline.

    sampler   medcl.sampling.pairs with sampling.pairing=frame, mixup=none (preset configs/simclr.yaml):
              two augmentations of one frame; frames of one video may meet as negatives
    f, g      ResNet-18 backbone (exported) and 2-layer projection head, 256 out
    L = NT-Xent(g(f(view1)), g(f(view2)); tau)
Any other sampling (e.g. pairing=video) gives the USCL ablations without the classifier.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medcl.config import Config
from medcl.losses.ntxent import NTXentLoss
from medcl.methods.base import Method
from medcl.models.backbones import build_backbone, feature_dim
from medcl.models.heads import ProjectionHead
from medcl.distributed import is_distributed


class SimCLR(Method):
    name = "simclr"

    def __init__(self, *, in_channels: int = 1, temperature: float = 0.5, proj_hidden: int = 512,
                 proj_dim: int = 256, backbone: str = "resnet18") -> None:
        super().__init__()
        self.backbone_spec = {"name": backbone, "kwargs": {"in_channels": in_channels}}
        self.backbone = build_backbone(backbone, in_channels=in_channels)
        features = feature_dim(self.backbone, in_channels)  # 512 for ResNet-18
        self.projection = ProjectionHead(features, proj_hidden, proj_dim)
        self.contrast = NTXentLoss(temperature, gather_distributed=is_distributed())

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        n = batch["view1"].shape[0]
        z = self.projection(self.backbone(torch.cat([batch["view1"], batch["view2"]])))
        loss = self.contrast(z[:n], z[n:])
        return {"loss": loss}


def build(config: Config, *, rank: int = 0, world_size: int = 1):
    from medcl.sampling.pairs import frame_set_loader

    loader, _, _ = frame_set_loader(config, rank=rank, world_size=world_size)
    method = SimCLR(in_channels=config.data.in_channels, temperature=config.params.temperature,
                    proj_hidden=config.model.proj_hidden, proj_dim=config.model.proj_dim, backbone=config.model.backbone)
    return method, loader
