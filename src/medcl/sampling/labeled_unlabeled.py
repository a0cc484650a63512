"""Labeled + unlabeled frame batches for the semi-supervised baselines (FixMatch, Pi-model,
Temporal Ensembling).

Each step holds B labeled frames (B = ``optim.batch_size``) and mu * B unlabeled frames:

- labeled: frames of the labeled videos (``data.label_fraction`` of them per class, the selection
  USCL uses, :func:`medcl.sampling.pairs.read_frame_sets`); a frame's label is its video's label.
  They are drawn from the loader's random stream, without replacement within a batch when there
  are enough, so a handful of labeled videos (1% of US-4) is enough.
- unlabeled: every frame of every video, labels ignored (FixMatch also uses its labeled images as
  unlabeled). An epoch is one pass over them (:class:`~medcl.sampling.loader.IndexBatchLoader`:
  each frame once, the last incomplete batch dropped), which is what Temporal Ensembling's
  per-sample ensemble relies on.

Views: the labeled frames get one weak augmentation (the shared ``augment`` section); the
unlabeled frames one view per entry of ``views``: ``"weak"`` (the same augmentation, drawn anew)
or ``"strong"`` (:func:`medcl.sampling.augment.strong_augment_frames`).

Batch layout (``make_batch``): ``{"labeled": float [b, C, S, S], "label": int64 [b],
"unlabeled": [float [m, C, S, S] per view], "item": int64 [m] (global frame index)}``; per process
b = B / world_size and m = mu * B / world_size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from medcl.sampling.augment import AugmentParams, StrongAugmentParams, augment_frames, strong_augment_frames
from medcl.sampling.loader import IndexBatchLoader
from medcl.sampling.pairs import pack_frames, read_frame_sets

if TYPE_CHECKING:
    from medcl.config import Config

VIEW_KINDS = ("weak", "strong")


class LabeledUnlabeledBatches:
    """Builds the batches of the module docstring from per-video frame sets and video targets (-1 = unlabeled)."""

    def __init__(self, frames: list[np.ndarray], targets: np.ndarray, *, labeled_batch: int,
                 views: Sequence[str] = ("weak",), size: int = 224, channels: int = 1,
                 augment: AugmentParams | None = None, strong: StrongAugmentParams | None = None,
                 device: torch.device | str = "cpu") -> None:
        if any(kind not in VIEW_KINDS for kind in views) or not views:
            raise ValueError(f"views must be a non-empty list of {VIEW_KINDS}, got {list(views)}")
        if labeled_batch < 1:
            raise ValueError(f"labeled_batch must be >= 1, got {labeled_batch}")
        if len(frames) != len(targets):
            raise ValueError(f"{len(frames)} frame sets but {len(targets)} targets")
        self.views, self.labeled_batch = tuple(views), labeled_batch
        self.size, self.channels, self.device = size, channels, torch.device(device)
        self.augment, self.strong = augment or AugmentParams(), strong or StrongAugmentParams()
        counts = [f.shape[0] for f in frames]
        self.frame_label = torch.as_tensor(np.repeat(np.asarray(targets, dtype=np.int64), counts))
        self.labeled = np.flatnonzero(self.frame_label.numpy() >= 0)
        if len(self.labeled) == 0:
            raise ValueError("no labeled video: semi-supervised methods need some (raise data.label_fraction?)")
        min_scale = self.augment.crop_scale[0] if self.augment.enabled else 1.0
        self.frames = pack_frames(frames, max_side=math.ceil(size / math.sqrt(min_scale)))  # uint8 [total, H, W]

    @property
    def n_items(self) -> int:
        """Unlabeled items an epoch permutes: every frame."""
        return int(self.frames.shape[0])

    def make_batch(self, items: np.ndarray, rng: np.random.Generator) -> dict[str, Tensor | list[Tensor]]:
        items = np.asarray(items, dtype=np.int64)
        chosen = rng.choice(self.labeled, size=self.labeled_batch, replace=len(self.labeled) < self.labeled_batch)
        labeled = self.frames[torch.from_numpy(chosen)].to(self.device, non_blocking=True)
        unlabeled = self.frames[torch.from_numpy(items)].to(self.device, non_blocking=True)
        n_weak = self.views.count("weak")
        weak = augment_frames(torch.cat([labeled] + [unlabeled] * n_weak), self.size, rng, self.augment, self.channels)
        weak_views = iter(weak[len(chosen):].split(len(items)))
        views = [next(weak_views) if kind == "weak"
                 else strong_augment_frames(unlabeled, self.size, rng, self.augment, self.strong, self.channels)
                 for kind in self.views]
        return {"labeled": weak[:len(chosen)], "label": self.frame_label[torch.from_numpy(chosen)], "unlabeled": views,
                "item": torch.from_numpy(items)}


def labeled_unlabeled_loader(config: Config, *, mu: int, views: Sequence[str], strong: StrongAugmentParams | None = None,
                             rank: int = 0, world_size: int = 1) -> tuple[IndexBatchLoader, LabeledUnlabeledBatches, list[str]]:
    """The loader of the semi-supervised methods: (loader, batches, classes). ``optim.batch_size``
    is the global labeled batch B; the loader's batches are the mu * B unlabeled frames."""
    data = read_frame_sets(config, world_size=world_size)
    labeled_batch = config.optim.batch_size
    if labeled_batch % world_size:
        raise ValueError(f"optim.batch_size={labeled_batch} must be a multiple of the {world_size} processes")
    batches = LabeledUnlabeledBatches(
        data.frames, data.targets, labeled_batch=labeled_batch // world_size, views=views, size=config.data.size,
        channels=config.data.in_channels, augment=AugmentParams.from_config(config.augment), strong=strong,
        device=data.device)
    unlabeled_batch = mu * labeled_batch
    if unlabeled_batch > batches.n_items:
        raise ValueError(f"optim.batch_size={labeled_batch} x {config.method}.mu={mu} = {unlabeled_batch} unlabeled frames "
                         f"per step, but {data.source} holds {batches.n_items} frames; lower optim.batch_size or "
                         f"{config.method}.mu")
    loader = IndexBatchLoader(batches.n_items, unlabeled_batch, batches.make_batch, seed=config.train.seed, rank=rank,
                              world_size=world_size, what=f"frames in {data.source}")
    return loader, batches, data.classes
