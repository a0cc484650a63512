"""MixCL views (Li, Quan, Zhou, Sec. 2.1 and 2.3.1): from each pooled item a training sample of

- P1: a patch cropped from image I1 (with mask S1) and deformed (affine, elastic; image and mask
  together), and its two views V1, V1' made by independent INTENSITY augmentations only (intensity
  shift, gamma, Gaussian smoothing, Gaussian noise): the views stay pixel-aligned, which the
  pixel-level identity loss needs (position m of V1 is position m of V1');
- P2: an auxiliary patch with mask S2, cropped from I1 or, at 1:1, from another image I2 of the
  SAME source, deformed and augmented the same way (one view V2).

Crops: with probability ``fg_crop_prob`` the patch is centred on a random labelled (foreground)
pixel, else anywhere (like MONAI's RandCropByPosNegLabel, pos:neg = 1:1 by default), so that small
organs appear in the label loss. Images smaller than the patch are padded: image 0, label
``IGNORE_INDEX`` (padding is not background). Geometric augmentation pads the same way.

All randomness comes from the numpy Generator the loader passes (``make_batch(indices, rng)``):
MONAI transforms are re-seeded from it per sample, so a resumed run draws the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medcl.data.pool import IGNORE_INDEX, SegmentationPool


def crop_patch(image: np.ndarray, label: np.ndarray, size: Sequence[int], rng: np.random.Generator,
               fg_prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Random crop of ``image [C, *S]`` / ``label [*S]`` to ``size`` (padding as described above)."""
    spatial = label.shape
    size = tuple(int(s) for s in size)
    if len(size) != len(spatial):
        raise ValueError(f"patch size {size} does not match image dims {spatial}")
    fg = None
    if fg_prob > 0 and rng.random() < fg_prob:
        where = np.flatnonzero(label > 0)
        if where.size:
            fg = np.unravel_index(where[rng.integers(where.size)], spatial)
    starts = []
    for d, (n, p) in enumerate(zip(spatial, size)):
        if fg is not None:
            lo = int(fg[d]) - p // 2
            start = int(np.clip(lo, min(0, n - p), max(0, n - p)))
        else:
            start = int(rng.integers(0, n - p + 1)) if n >= p else -int(rng.integers(0, p - n + 1))
        starts.append(start)
    out_img = np.zeros((image.shape[0],) + size, dtype=np.float32)
    out_lab = np.full(size, IGNORE_INDEX, dtype=np.int64)
    src, dst = [], []
    for start, n, p in zip(starts, spatial, size):
        a, b = max(start, 0), min(start + p, n)
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start))
    out_img[(slice(None), *dst)] = image[(slice(None), *src)]
    out_lab[tuple(dst)] = label[tuple(src)]
    return out_img, out_lab


class MixCLViewMaker:
    """Builds MixCL batches from a :class:`SegmentationPool`; ``make_batch(indices, rng) -> dict``.

    Batch keys: ``view1``, ``view1b``, ``view2`` (augmented, ``[B, C, *P]``), ``patch1``,
    ``patch2`` (clean patches: reconstruction targets), ``label1``, ``label2`` (``[B, *P]`` global
    ids), ``annotated1``, ``annotated2`` (``[B, K + 1]``), ``source`` (``[B]``).
    """

    def __init__(
        self,
        pool: SegmentationPool,
        patch_size: int | Sequence[int],
        same_image_prob: float = 0.5,
        fg_crop_prob: float = 0.5,
        affine_prob: float = 0.5,
        elastic_prob: float = 0.0,
        intensity_prob: float = 0.2,
    ) -> None:
        from monai.transforms import (
            Compose,
            Rand2DElasticd,
            Rand3DElasticd,
            RandAdjustContrast,
            RandAffined,
            RandGaussianNoise,
            RandGaussianSmooth,
            RandShiftIntensity,
        )

        dims = pool.spatial_dims
        self.pool = pool
        self.patch_size = (int(patch_size),) * dims if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(self.patch_size) != dims:
            raise ValueError(f"patch_size {self.patch_size} has {len(self.patch_size)} dims, the pool is {dims}D")
        for name, p in dict(same_image_prob=same_image_prob, fg_crop_prob=fg_crop_prob, affine_prob=affine_prob,
                            elastic_prob=elastic_prob, intensity_prob=intensity_prob).items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.same_image_prob, self.fg_crop_prob = same_image_prob, fg_crop_prob
        keys = ["image", "label"]
        angle = np.pi / 12
        geometric: list[Any] = []
        if affine_prob > 0:
            geometric.append(RandAffined(keys, prob=affine_prob, rotate_range=(angle,) * (1 if dims == 2 else 3),
                                         scale_range=(0.1,) * dims, mode=("bilinear", "nearest"), padding_mode="zeros"))
        if elastic_prob > 0:
            if dims == 2:
                geometric.append(Rand2DElasticd(keys, prob=elastic_prob, spacing=(16, 16), magnitude_range=(1, 2),
                                                mode=("bilinear", "nearest"), padding_mode="zeros"))
            else:
                geometric.append(Rand3DElasticd(keys, prob=elastic_prob, sigma_range=(5, 7), magnitude_range=(50, 100),
                                                mode=("bilinear", "nearest"), padding_mode="zeros"))
        self.geometric = Compose(geometric) if geometric else None
        self.intensity = Compose([
            RandShiftIntensity(offsets=0.1, prob=intensity_prob),
            RandAdjustContrast(prob=intensity_prob, gamma=(0.7, 1.5)),
            RandGaussianSmooth(prob=intensity_prob, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0)),
            RandGaussianNoise(prob=intensity_prob, std=0.05),
        ])

    def _patch(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, label = crop_patch(sample["image"], sample["label"], self.patch_size, rng, self.fg_crop_prob)
        if self.geometric is not None:
            self.geometric.set_random_state(seed=int(rng.integers(2**31)))
            # labels shifted by one so that the zero padding of the warp becomes IGNORE_INDEX
            out = self.geometric({"image": image, "label": (label + 1)[None].astype(np.float32)})
            image = np.asarray(out["image"], dtype=np.float32)
            label = np.rint(np.asarray(out["label"])[0]).astype(np.int64) - 1
        return image, label

    def _view(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        self.intensity.set_random_state(seed=int(rng.integers(2**31)))
        return np.asarray(self.intensity(patch), dtype=np.float32)

    def make_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        first = self.pool[int(index)]
        second_index = int(index)
        if rng.random() >= self.same_image_prob:
            candidates = self.pool.items_of_source[first["source"]]
            if len(candidates) > 1:
                second_index = int(candidates[rng.integers(len(candidates))])
                while second_index == index:
                    second_index = int(candidates[rng.integers(len(candidates))])
        second = first if second_index == index else self.pool[second_index]
        patch1, label1 = self._patch(first, rng)
        patch2, label2 = self._patch(second, rng)
        return {
            "view1": self._view(patch1, rng), "view1b": self._view(patch1, rng), "view2": self._view(patch2, rng),
            "patch1": patch1, "patch2": patch2, "label1": label1, "label2": label2,
            "annotated1": first["annotated"], "annotated2": second["annotated"], "source": first["source"],
        }

    def make_batch(self, indices: Sequence[int], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        samples = [self.make_sample(int(i), rng) for i in indices]
        return {key: torch.as_tensor(np.stack([s[key] for s in samples])) for key in samples[0]}
