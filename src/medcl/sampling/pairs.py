"""USCL sample pair generation (SPG) over per-video frame sets.

Chen et al., "USCL: Pretraining deep ultrasound image diagnosis model through video contrastive
representation learning", MICCAI 2021, Sec. 2.2:

- I1, negatives across videos (``pairing="video"``): a batch is a set of distinct videos and each
  contributes exactly one positive pair, so two samples of different pairs always come from
  different videos. ``pairing="frame"`` is vanilla SimCLR: batch items are frames drawn from the
  pool of all frames, so frames of one video can meet as negatives (the "similarity conflict").
- I2, positive pair by interpolation (``mixup="paper"``): draw three distinct frames x1, x2, x3
  of the video (x2 the anchor) and xi1, xi2 ~ Beta(alpha, beta) independently::

      view1 = xi1 * aug(x1) + (1 - xi1) * aug(x2)
      view2 = xi2 * aug(x3) + (1 - xi2) * aug'(x2)

  Every frame is augmented independently before mixing (the anchor twice, once per view).
  ``mixup="shared_lambda"`` uses one weight for both views (the authors' public code);
  ``mixup="none"`` pairs two distinct frames of the video without mixing.
  With ``pairing="frame"`` and mixup on, the drawn frame is the anchor and x1, x3 are two other
  frames of its video.
- Fallbacks: a 2-frame video gives its two frames as the pair (no mixing); a 1-frame video gives
  two augmentations of its frame.

The paper's ablation (Table 2) maps onto the options: vanilla contrastive = ``pairing=frame
mixup=none`` (configs/simclr.yaml); +I1 = ``pairing=video mixup=none``; +I2 = ``pairing=frame
mixup=paper``; +I1+I2 = ``pairing=video mixup=paper`` with ``uscl.lambda_sup=0``; + CE = configs/uscl.yaml.

All frames of a video share the video's label, so the mixed label equals the video's label; the
batch carries it as a hard class index (``-1`` = unlabeled).

Frames stay in CPU memory; with ``device="cuda"`` only the chosen uint8 frames of a batch are copied
to the GPU and augmented and mixed there (CPU augmentation would starve a GPU at 224 px).

Batch layout (``make_batch``): ``{"view1", "view2": float [B, C, size, size] in [0, 1],
"label": int64 [B] (-1 unlabeled), "video": int64 [B] (video index)}``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medcl.environment import resolve_device
from medcl.sampling.augment import AugmentParams, augment_frames
from medcl.sampling.loader import IndexBatchLoader

if TYPE_CHECKING:
    from medcl.config import Config
    from medcl.sampling.streamed import PairRecipe, StreamedFrameSetLoader

Pairing = Literal["video", "frame"]
Mixup = Literal["paper", "shared_lambda", "none"]


@dataclass
class PairPlan:
    """Global frame indices and weights of a batch: ``view = w * aug(a) + (1 - w) * aug(b)``.

    ``b`` is -1 where a view is not mixed (``w == 1``).
    """

    video: np.ndarray  # [B]
    view1_a: np.ndarray
    view1_b: np.ndarray
    view1_w: np.ndarray
    view2_a: np.ndarray
    view2_b: np.ndarray
    view2_w: np.ndarray


class PairGenerator:
    """Builds USCL positive pairs from frame sets (see the module docstring).

    ``frames``: one uint8 array [n_i, H, W] per video (frames of a different size are resized to
    the most common size once, here, or to ``frame_shape`` when given). ``targets``: int64 class
    index per video, -1 = unlabeled.
    """

    def __init__(
        self,
        frames: list[np.ndarray],
        targets: np.ndarray,
        *,
        pairing: Pairing = "video",
        mixup: Mixup = "paper",
        alpha: float = 0.5,
        beta: float = 0.5,
        size: int = 224,
        channels: int = 1,
        augment: AugmentParams | None = None,
        device: torch.device | str = "cpu",
        frame_shape: tuple[int, int] | None = None,
    ) -> None:
        if pairing not in ("video", "frame"):
            raise ValueError(f"pairing must be 'video' or 'frame', got {pairing!r}")
        if mixup not in ("paper", "shared_lambda", "none"):
            raise ValueError(f"mixup must be 'paper', 'shared_lambda' or 'none', got {mixup!r}")
        if not (alpha > 0 and beta > 0):
            raise ValueError(f"Beta parameters must be > 0, got alpha={alpha}, beta={beta}")
        if len(frames) != len(targets):
            raise ValueError(f"{len(frames)} frame sets but {len(targets)} targets")
        if not frames:
            raise ValueError("no videos to sample from")
        for i, f in enumerate(frames):
            if f.ndim != 3 or f.shape[0] < 1:
                raise ValueError(f"video {i}: expected frames [n >= 1, H, W], got shape {f.shape}")
        self.pairing, self.mixup = pairing, mixup
        self.alpha, self.beta = float(alpha), float(beta)
        self.size, self.channels = size, channels
        self.augment = augment or AugmentParams()
        self.device = torch.device(device)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.counts = np.array([f.shape[0] for f in frames], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.frame_video = np.repeat(np.arange(len(frames)), self.counts)
        # Frames much larger than the model input are shrunk once (area filter, anti-aliased) to the
        # smallest side at which even the smallest random crop still holds `size` source pixels.
        min_scale = self.augment.crop_scale[0] if self.augment.enabled else 1.0
        max_side = math.ceil(size / math.sqrt(min_scale))
        self.frames = pack_frames(frames, max_side=max_side, shape=frame_shape)  # uint8 [total, H, W]

    @property
    def n_items(self) -> int:
        """Items an epoch permutes: videos (``pairing="video"``) or frames (``"frame"``)."""
        return len(self.counts) if self.pairing == "video" else int(self.counts.sum())

    def plan(self, items: np.ndarray, rng: np.random.Generator) -> PairPlan:
        """Choose frames and mixing weights for batch ``items`` (video or frame indices)."""
        b = len(items)
        video = np.empty(b, dtype=np.int64)
        cols = {k: np.full(b, -1, dtype=np.int64) for k in ("v1a", "v1b", "v2a", "v2b")}
        w1 = np.ones(b, dtype=np.float32)
        w2 = np.ones(b, dtype=np.float32)
        mix = self.mixup != "none"
        for row, item in enumerate(np.asarray(items, dtype=np.int64)):
            if self.pairing == "video":
                v, anchor = int(item), None
            else:
                v = int(self.frame_video[item])
                anchor = int(item - self.offsets[v])
            n, base = int(self.counts[v]), int(self.offsets[v])
            video[row] = v
            if n >= 3 and mix:
                if anchor is None:
                    x1, x2, x3 = rng.choice(n, size=3, replace=False)
                else:
                    others = rng.choice(n - 1, size=2, replace=False)
                    x1, x3 = (o + (o >= anchor) for o in others)
                    x2 = anchor
                xi1 = rng.beta(self.alpha, self.beta)
                xi2 = xi1 if self.mixup == "shared_lambda" else rng.beta(self.alpha, self.beta)
                cols["v1a"][row], cols["v1b"][row], w1[row] = base + x1, base + x2, xi1
                cols["v2a"][row], cols["v2b"][row], w2[row] = base + x3, base + x2, xi2
            elif n >= 2 and (anchor is None or mix):
                if anchor is None:
                    x1, x2 = rng.choice(n, size=2, replace=False)
                else:
                    other = int(rng.integers(n - 1))
                    x1, x2 = anchor, other + (other >= anchor)
                cols["v1a"][row], cols["v2a"][row] = base + x1, base + x2
            else:  # one frame (or frame pairing without mixup): two augmentations of it
                f = 0 if anchor is None else anchor
                cols["v1a"][row] = cols["v2a"][row] = base + f
        return PairPlan(video, cols["v1a"], cols["v1b"], w1, cols["v2a"], cols["v2b"], w2)

    def render(self, plan: PairPlan, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Augment every needed frame independently (one batched call), then mix."""
        b = len(plan.video)
        mixed1, mixed2 = plan.view1_b >= 0, plan.view2_b >= 0
        index = np.concatenate([plan.view1_a, plan.view2_a, plan.view1_b[mixed1], plan.view2_b[mixed2]])
        chosen = self.frames[torch.from_numpy(index)].to(self.device, non_blocking=True)  # uint8: small transfer
        images = augment_frames(chosen, self.size, rng, self.augment, self.channels)
        view1, view2 = images[:b], images[b : 2 * b]  # views of a fresh tensor: mixing in place is safe
        extra = images[2 * b :]
        n1 = int(mixed1.sum())
        for view, mixed, weights, others in ((view1, mixed1, plan.view1_w, extra[:n1]), (view2, mixed2, plan.view2_w, extra[n1:])):
            if others.shape[0]:
                rows = torch.from_numpy(np.flatnonzero(mixed)).to(view.device)
                w = torch.from_numpy(weights[mixed]).to(view.device).view(-1, 1, 1, 1)
                view[rows] = w * view[rows] + (1.0 - w) * others
        return view1, view2

    def make_batch(self, items: np.ndarray, rng: np.random.Generator) -> dict[str, Tensor]:
        plan = self.plan(items, rng)
        view1, view2 = self.render(plan, rng)
        video = torch.from_numpy(plan.video)
        return {"view1": view1, "view2": view2, "label": self.targets[video], "video": video}


def pack_frames(frames: list[np.ndarray], max_side: int | None = None, shape: tuple[int, int] | None = None) -> Tensor:
    """All videos' uint8 frames as one tensor [total, H, W] (video after video), at the most common
    frame size (or ``shape``: the corpus' size when ``frames`` are a few of its videos), shrunk
    (area filter) so that the longer side is at most ``max_side``."""
    shapes = Counter(f.shape[1:] for f in frames)
    common = tuple(shape) if shape is not None else shapes.most_common(1)[0][0]
    if len(shapes) > 1 and shape is None:
        warnings.warn(f"frame sets have {len(shapes)} frame sizes; resizing all to {common[0]}x{common[1]}", stacklevel=3)
    if max_side is not None and max(common) > max_side:
        factor = max_side / max(common)
        common = (max(1, round(common[0] * factor)), max(1, round(common[1] * factor)))
    parts = []
    for f in frames:
        t = torch.from_numpy(np.ascontiguousarray(f))
        if t.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames, got {t.dtype}")
        if tuple(t.shape[1:]) != tuple(common):
            t = F.interpolate(t.unsqueeze(1).float(), size=common, mode="area").round().clamp(0, 255).to(torch.uint8)[:, 0]
        parts.append(t)
    return torch.cat(parts)


class FrameSetData(NamedTuple):
    """The frame sets of ``data.manifest`` as a frame-set sampler needs them."""

    frames: list[np.ndarray]  # uint8 [n_i, H, W] per video
    targets: np.ndarray  # int64 class index per video, -1 = unlabeled (or label not kept)
    classes: list[str]
    source: Path  # the manifest (for messages)
    device: torch.device  # where batches are augmented


def read_frame_sets(config: Config, *, world_size: int = 1, labeled_only: bool = False) -> FrameSetData:
    """Read ``config.data.manifest`` and keep a stratified ``data.label_fraction`` of the labels
    (seeded by ``data.label_seed``): the labeled videos every frame-set method uses. With
    ``labeled_only`` only those videos are read."""
    from medcl.data.frames import FrameSets
    from medcl.data.splits import label_targets, select_labeled_videos

    if config.data.store == "shards":
        raise ValueError(f"data.store=shards: method {config.method!r} reads every frame into memory (only the "
                         "frame-set methods uscl, simclr, moco and supervised stream shards); use data.store=memory")
    device = batch_device(config, world_size)
    sets = FrameSets(config.data.manifest, cache=False)  # frames are packed into one tensor by the sampler, once
    classes = sets.classes
    keep = select_labeled_videos(sets.labels, config.data.label_fraction, config.data.label_seed)
    targets = label_targets(sets.labels, classes, keep)
    indices = np.arange(len(sets)) if not labeled_only else np.flatnonzero(targets >= 0)
    if labeled_only and len(indices) == 0:
        raise ValueError(f"{sets.manifest_path}: no labeled video; this method needs labels")
    frames = [sets.load_frames(sets.records[int(i)]) for i in indices]
    return FrameSetData(frames, targets[indices], classes, Path(sets.manifest_path), device)


def batch_device(config: Config, world_size: int) -> torch.device:
    """Where batches are augmented: ``train.device``, this process's GPU under torchrun."""
    device = resolve_device(config.train.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def frame_set_loader(
    config: Config, *, rank: int = 0, world_size: int = 1, labeled_only: bool = False
) -> tuple[IndexBatchLoader | StreamedFrameSetLoader, PairGenerator | PairRecipe, list[str]]:
    """The loader every frame-set method (USCL, SimCLR, supervised, MoCo) trains on.

    ``data.store`` (resolved by :func:`medcl.data.shards.resolve_store`) picks it: ``memory`` reads
    the frame sets (:func:`read_frame_sets`), optionally keeps only the labeled videos, and builds
    the pair generator and a resumable, rank-sharded :class:`IndexBatchLoader`; ``shards`` streams
    them (:func:`medcl.sampling.streamed.streamed_frame_set_loader`). Returns (loader, pair
    generator or recipe, classes).
    """
    from medcl.data.shards import resolve_store

    if resolve_store(config.data.store, config.data.manifest) == "shards":
        from medcl.sampling.streamed import streamed_frame_set_loader

        return streamed_frame_set_loader(config, PairGenerator, batch_device(config, world_size), rank=rank,
                                         world_size=world_size, labeled_only=labeled_only)
    data = read_frame_sets(config, world_size=world_size, labeled_only=labeled_only)
    generator = PairGenerator(
        data.frames,
        data.targets,
        pairing=config.sampling.pairing,
        mixup=config.sampling.mixup,
        alpha=config.sampling.alpha,
        beta=config.sampling.beta,
        size=config.data.size,
        channels=config.data.in_channels,
        augment=AugmentParams.from_config(config.augment),
        device=data.device,
    )
    what = "videos" if config.sampling.pairing == "video" else "frames"
    loader = IndexBatchLoader(
        generator.n_items, config.optim.batch_size, generator.make_batch,
        seed=config.train.seed, rank=rank, world_size=world_size, what=f"{what} in {data.source}",
    )
    return loader, generator, data.classes
