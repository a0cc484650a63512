"""Batched on-the-fly augmentation of grayscale ultrasound frames (plain tensor ops).

Random resized crop, horizontal flip and a small rotation are composed into ONE affine matrix per
image and applied with a single ``grid_sample`` that also resizes to the output size; brightness
and contrast jitter follow. Parameters come from a ``numpy.random.Generator`` so that a run's
augmentation stream can be checkpointed and resumed exactly.

Output: float32 in [0, 1] (uint8 frames become x / 255 through :func:`medcl.inputs.unit_range`, the
one input convention), shape [n, channels, size, size] (grayscale repeated when channels > 1), on
the device of the input frames (the random parameters are drawn on the CPU either way).
Regions rotated in from outside the frame are black, like the area around an ultrasound fan.

Strong augmentation (:func:`strong_augment_frames`, FixMatch's "strong" view): the same geometric
and jitter steps, then ``StrongAugmentParams.ops`` intensity operations per image drawn from
:data:`STRONG_OPS` with a random magnitude each (RandAugment as FixMatch uses it, Sohn et al. 2020,
Sec. 2.3 and Table 12, with the grayscale-meaningful operations plus ultrasound speckle), then
Cutout (a square of up to ``cutout`` of the side, filled with 0.5).
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


def affine_grid(theta: Tensor, size: int) -> Tensor:
    """``F.affine_grid(theta, [n, 1, size, size], align_corners=False)``, bit for bit (tested), by
    broadcasting instead of PyTorch's batched matrix product over every pixel: the same pixel-centre
    coordinates and the same order of operations, ~2x faster on CPU (16 images at 224 px; the grid
    cost more than the ``grid_sample`` itself, the largest part of building a pretraining batch)."""
    coords = torch.linspace(-1, 1, size, dtype=theta.dtype, device=theta.device) * (size - 1) / size
    t = theta.view(-1, 1, 1, 2, 3)  # grid[n, i, j, k] = theta[n, k, 0] x_j + theta[n, k, 1] y_i + theta[n, k, 2]
    return (t[..., 0] * coords.view(1, 1, size, 1) + t[..., 1] * coords.view(1, size, 1, 1)) + t[..., 2]


def augment_frames(
    frames: Tensor, size: int, rng: np.random.Generator, params: AugmentParams, channels: int = 1
) -> Tensor:
    """Augment uint8 (or float in [0, 1]) frames [n, H, W] independently -> float [n, C, size, size]."""
    if frames.ndim != 3:
        raise ValueError(f"expected frames [n, H, W], got shape {tuple(frames.shape)}")
    n = frames.shape[0]
    images = unit_range(frames.unsqueeze(1))  # the one input convention: x / 255
    theta = random_affine(n, rng, params).to(images.device)
    grid = affine_grid(theta, size)
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


@dataclass
class StrongAugmentParams:
    """Strong augmentation on top of :class:`AugmentParams` (mirrors ``fixmatch.randaugment_ops`` / ``.cutout``)."""

    ops: int = 2  # operations per image (RandAugment's N), each with a random magnitude
    cutout: float = 0.5  # Cutout square side: uniform in [0, cutout] of the image side (FixMatch: 0.5)


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of [n, 1, H, W] with one sigma (pixels) per image (grouped convolutions)."""
    n, _, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    y = x.reshape(1, n, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(n, 1, -1, 1), groups=n)
    return y.reshape(n, 1, h, w)


def _autocontrast(x: Tensor, m: Tensor, noise: torch.Generator) -> Tensor:
    low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-6)


def _contrast(x: Tensor, m: Tensor, noise: torch.Generator) -> Tensor:
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * _per_image(0.3 + 1.4 * m) + mean  # factor 0.3-1.7


def _speckle(x: Tensor, m: Tensor, noise: torch.Generator) -> Tensor:
    # multiplicative noise: what ultrasound speckle is
    return x * (1 + _per_image(0.05 + 0.25 * m) * torch.randn(x.shape, generator=noise, device=x.device))


def _posterize(x: Tensor, m: Tensor, noise: torch.Generator) -> Tensor:
    levels = _per_image(2.0 ** torch.round(2 + 4 * m) - 1)  # 2 to 6 bits
    return torch.round(x * levels) / levels


# name -> op(images [n, 1, S, S] in [0, 1], magnitude [n] in [0, 1), torch generator) -> images
STRONG_OPS = {
    "identity": lambda x, m, noise: x,
    "brightness": lambda x, m, noise: x * _per_image(0.5 + m),  # factor 0.5-1.5
    "contrast": _contrast,
    "gamma": lambda x, m, noise: x.clamp_min(1e-6) ** _per_image(torch.exp(1.4 * m - 0.7)),  # gamma 0.5-2
    "autocontrast": _autocontrast,
    "blur": lambda x, m, noise: _gaussian_blur(x, (0.2 + 1.8 * m) * x.shape[-1] / 112),  # sigma 0.4-4 px at 224 px
    "speckle": _speckle,
    "posterize": _posterize,
    "solarize": lambda x, m, noise: torch.where(x >= _per_image(0.5 + 0.5 * m), 1 - x, x),
}


def random_intensity_ops(images: Tensor, rng: np.random.Generator, n_ops: int) -> Tensor:
    """Apply ``n_ops`` distinct operations of :data:`STRONG_OPS` per image (random magnitudes), in place."""
    if not 1 <= n_ops <= len(STRONG_OPS):
        raise ValueError(f"n_ops must be in [1, {len(STRONG_OPS)}], got {n_ops}")
    n = images.shape[0]
    chosen = rng.random((n, len(STRONG_OPS))).argsort(axis=1)[:, :n_ops]
    magnitude = torch.from_numpy(rng.random((n, len(STRONG_OPS)), dtype=np.float32)).to(images.device)
    noise = torch.Generator(device=images.device).manual_seed(int(rng.integers(2**62)))  # seeded by rng: resumable
    for k, op in enumerate(STRONG_OPS.values()):
        rows = torch.from_numpy(np.flatnonzero((chosen == k).any(axis=1))).to(images.device)
        if len(rows):
            images[rows] = op(images[rows], magnitude[rows, k], noise).clamp(0.0, 1.0)
    return images


def cutout(images: Tensor, rng: np.random.Generator, max_fraction: float, fill: float = 0.5) -> Tensor:
    """Cutout (DeVries & Taylor 2017): per image a square of side uniform in [0, max_fraction] of the
    image side, centred anywhere (clipped at the border), set to ``fill``."""
    n, _, h, w = images.shape
    half = torch.from_numpy(rng.uniform(0.0, max_fraction, size=n).astype(np.float32) / 2).to(images.device)[:, None]
    centre = torch.from_numpy(rng.random((n, 2), dtype=np.float32)).to(images.device)
    ys = (torch.arange(h, device=images.device) + 0.5) / h
    xs = (torch.arange(w, device=images.device) + 0.5) / w
    inside = ((ys[None] - centre[:, :1]).abs() < half)[:, :, None] & ((xs[None] - centre[:, 1:]).abs() < half)[:, None, :]
    return images.masked_fill(inside[:, None], fill)


def strong_augment_frames(frames: Tensor, size: int, rng: np.random.Generator, params: AugmentParams,
                          strong: StrongAugmentParams, channels: int = 1) -> Tensor:
    """Strongly augment uint8 (or [0, 1]) frames [n, H, W] -> float [n, C, size, size] (module docstring)."""
    out = random_intensity_ops(augment_frames(frames, size, rng, params), rng, strong.ops)
    out = cutout(out, rng, strong.cutout)
    if channels > 1:
        out = out.expand(out.shape[0], channels, size, size).contiguous()
    return out
