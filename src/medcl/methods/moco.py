"""MoCo v2 (He et al., CVPR 2020; Chen, Fan, Girshick, He, arXiv:2003.04297): a self-supervised
baseline of the USCL paper's Table 3.

    sampler   medcl.sampling.pairs, preset configs/moco.yaml: pairing=frame, mixup=none
              (two augmentations of one frame)
    f_q, g_q  ResNet-18 backbone (exported) and 2-layer MLP head (512 -> 512 -> 128)
    f_k, g_k  momentum copies: theta_k <- m theta_k + (1 - m) theta_q before each step, m = 0.999
    queue     the K most recent keys (unit vectors, K = 65536), the negatives
    L = InfoNCE(q = g_q(f_q(view1)), k = g_k(f_k(view2)), queue; tau = 0.2)   (losses/queue_infonce.py)
then the step's keys replace the oldest K-queue entries.

State: the key encoder, ``queue`` and ``queue_ptr`` are part of ``state_dict()``, so checkpoints
hold them and ``--resume`` continues exactly. Export takes ``backbone.*`` only (not ``key_backbone.*``).

Distributed: the keys of all ranks are all-gathered (rank order) before they are enqueued, so
every rank holds the same queue as one process on the global batch; DDP's buffer broadcast keeps
it so. BatchNorm: per-process BN, no shuffle-BN. Each process normalises its own batch in f_q and
f_k (``train.sync_batchnorm: true`` makes it SyncBN, on GPUs). The query batch and the key batch
hold the same frames, so their BN statistics share a batch signature that can help to find the
positive; MoCo shuffles the keys across GPUs to break it (He et al., Sec. 3.3). That leak is
accepted here for simplicity and any world size (one process included); the K negatives come from
earlier batches and are unaffected.

Queue sizing: K must be a multiple of the global ``optim.batch_size`` (each step writes one block,
so the pointer wraps exactly at K) and at most the items one epoch visits (a larger queue holds
several keys of every frame, the query's own among them, as negatives). ``build`` refuses other
values and names a valid one: small corpora need a smaller queue (see configs/moco.yaml).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medcl.config import Config
from medcl.distributed import gather_no_grad
from medcl.losses.queue_infonce import QueueInfoNCELoss
from medcl.methods.base import Method
from medcl.models.backbones import build_backbone, feature_dim
from medcl.models.heads import ProjectionHead


class MoCo(Method):
    name = "moco"

    def __init__(self, *, in_channels: int = 1, temperature: float = 0.2, momentum: float = 0.999,
                 queue_size: int = 65536, proj_hidden: int = 512, proj_dim: int = 128, backbone: str = "resnet18") -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.backbone_spec = {"name": backbone, "kwargs": {"in_channels": in_channels}}
        self.backbone = build_backbone(backbone, in_channels=in_channels)
        self.projection = ProjectionHead(feature_dim(self.backbone, in_channels), proj_hidden, proj_dim)
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.contrast = QueueInfoNCELoss(temperature)
        self.momentum = momentum

    def start_backbone_from(self, state: dict[str, Tensor], source: str) -> None:
        super().start_backbone_from(state, source)
        self.key_backbone.load_state_dict(self.backbone.state_dict())  # the key encoder starts as the query one

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        q = self.projection(self.backbone(batch["view1"]))
        with torch.no_grad():
            self.momentum_update()
            k = self.key_projection(self.key_backbone(batch["view2"]))
        loss = self.contrast(q, k, self.queue.clone())  # a copy: the enqueue below must not touch the graph
        self.enqueue(k)
        return {"loss": loss}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for the backbone and the head (parameters only)."""
        for query, key in ((self.backbone, self.key_backbone), (self.projection, self.key_projection)):
            for p_q, p_k in zip(query.parameters(), key.parameters()):
                p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write every rank's ``keys`` (normalised, rank order) over the oldest queue entries."""
        keys = gather_no_grad(F.normalize(keys.float(), dim=1))
        n, size = keys.shape[0], self.queue.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the {n} keys per step "
                             "(moco.queue_size must be a multiple of optim.batch_size)")
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + n] = keys
        self.queue_ptr.fill_((ptr + n) % size)


def check_queue_size(queue_size: int, batch_size: int, items_per_epoch: int, what: str = "items") -> None:
    """Refuse a queue that is not a multiple of the global batch or larger than one epoch (module docstring)."""
    suggestion = max(batch_size, min(queue_size, items_per_epoch) // batch_size * batch_size)
    if queue_size % batch_size:
        raise ValueError(f"moco.queue_size={queue_size} must be a multiple of the global optim.batch_size={batch_size} "
                         f"(one block of keys per step); e.g. moco.queue_size={suggestion}")
    if queue_size > items_per_epoch:
        raise ValueError(f"moco.queue_size={queue_size} exceeds the {items_per_epoch} {what} one epoch visits: the queue "
                         f"would hold every frame's key, the query's own among them; use at most "
                         f"moco.queue_size={suggestion}")


def build(config: Config, *, rank: int = 0, world_size: int = 1):
    from medcl.sampling.pairs import frame_set_loader

    loader, _, _ = frame_set_loader(config, rank=rank, world_size=world_size)
    p, batch_size = config.params, config.optim.batch_size
    what = "videos" if config.sampling.pairing == "video" else "frames"
    check_queue_size(p.queue_size, batch_size, len(loader) * batch_size, what)
    method = MoCo(in_channels=config.data.in_channels, temperature=p.temperature, momentum=p.momentum,
                  queue_size=p.queue_size, proj_hidden=config.model.proj_hidden, proj_dim=config.model.proj_dim,
                  backbone=config.model.backbone)
    return method, loader
