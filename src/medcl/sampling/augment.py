"""Batched on-the-fly augmentation of grayscale ultrasound frames (plain tensor ops).

Random resized crop, horizontal flip and a small rotation are composed into ONE affine matrix per
image and applied with a single ``grid_sample`` that also resizes to the output size; brightness
and contrast jitter follow. Parameters come from a ``numpy.random.Generator`` so that a run's
augmentation stream can be checkpointed and resumed exactly.

Output: float32 in [0, 1] (uint8 frames become x / 255 through :func:`medcl.inputs.unit_range`, the
one input convention), shape [n, channels, size, size] (grayscale repeated when channels > 1), on
the device of the input frames (the random parameters are drawn on the CPU either way).
Regions rotated in from outside the frame are black, like the area around an ultrasound fan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medcl.inputs import unit_range


@dataclass
class AugmentParams:
    """Augmentation ranges (mirrors ``medcl.config.AugmentConfig``)."""

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip_p: float = 0.5
    rotate_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2

    @classmethod
    def from_config(cls, cfg) -> AugmentParams:  # AugmentConfig or any object with the same fields
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


def random_affine(n: int, rng: np.random.Generator, params: AugmentParams) -> Tensor:
    """[n, 2, 3] matrices mapping output to input coordinates (``affine_grid`` convention)."""
    if not params.enabled:
        theta = np.zeros((n, 2, 3), dtype=np.float32)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        return torch.from_numpy(theta)
    area = rng.uniform(*params.crop_scale, size=n)
    log_ratio = rng.uniform(math.log(params.crop_ratio[0]), math.log(params.crop_ratio[1]), size=n)
    ratio = np.exp(log_ratio)
    width = np.minimum(1.0, np.sqrt(area * ratio))  # fractions of the frame's width / height
    height = np.minimum(1.0, np.sqrt(area / ratio))
    cx = rng.uniform(-1.0, 1.0, size=n) * (1.0 - width)
    cy = rng.uniform(-1.0, 1.0, size=n) * (1.0 - height)
    flip = np.where(rng.random(n) < params.flip_p, -1.0, 1.0)
    angle = np.deg2rad(rng.uniform(-params.rotate_degrees, params.rotate_degrees, size=n))
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.empty((n, 2, 3), dtype=np.float32)
    # input = diag(width, height) @ R(angle) @ diag(flip, 1) @ output + centre
    theta[:, 0, 0] = width * cos * flip
    theta[:, 0, 1] = -width * sin
    theta[:, 1, 0] = height * sin * flip
    theta[:, 1, 1] = height * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return torch.from_numpy(theta)


def augment_frames(
    frames: Tensor, size: int, rng: np.random.Generator, params: AugmentParams, channels: int = 1
) -> Tensor:
    """Augment uint8 (or float in [0, 1]) frames [n, H, W] independently -> float [n, C, size, size]."""
    if frames.ndim != 3:
        raise ValueError(f"expected frames [n, H, W], got shape {tuple(frames.shape)}")
    n = frames.shape[0]
    images = unit_range(frames.unsqueeze(1))  # the one input convention: x / 255
    theta = random_affine(n, rng, params).to(images.device)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if params.enabled and (params.brightness > 0 or params.contrast > 0):
        contrast = torch.from_numpy(rng.uniform(1 - params.contrast, 1 + params.contrast, size=n).astype(np.float32)).to(out.device)
        brightness = torch.from_numpy(rng.uniform(1 - params.brightness, 1 + params.brightness, size=n).astype(np.float32)).to(out.device)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * contrast.view(n, 1, 1, 1) + mean) * brightness.view(n, 1, 1, 1)
        out = out.clamp_(0.0, 1.0)
    if channels > 1:
        out = out.expand(n, channels, size, size).contiguous()
    return out
