"""The one input convention: how stored uint8 frames become the tensor a backbone sees.

Every place that feeds a 2D backbone imports this module: pretraining (the batched augmentations
of :mod:`medcl.sampling.augment`), classification fine-tuning and its feature cache
(:mod:`medcl.evaluate.classify`), the report's Grad-CAM and embeddings, the model card, and later
prediction. The steps, in order:

1. :func:`resize_frames`: uint8 ``[n, H, W]`` -> uint8 ``[n, 1, S, S]`` (bilinear, antialiased,
   rounded back to uint8: the resized copy is what is stored and cached);
2. :func:`unit_range`: ``x / 255`` -> float in [0, 1] (augmentation works in this range);
3. :meth:`InputSpec.normalize`: replicate the gray channel to ``in_channels`` and standardise with
   the backbone's ``mean`` / ``std`` (identity for medcl's own backbones: mean 0, std 1, i.e.
   inputs stay in [0, 1]; an ImageNet backbone would record ImageNet's statistics here).

:func:`to_model_input` is steps 2 + 3. A backbone's :class:`InputSpec` travels with its weights
(checkpoint ``backbone.input``, safetensors metadata ``input``) and is recorded in fine-tuning
run folders, so every consumer applies exactly what training applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects: ``in_channels`` (gray replicated) and per-channel mean / std
    applied to [0, 1] inputs. The default (1 channel, mean 0, std 1) is medcl's own convention."""

    in_channels: int = 1
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) not in (1, self.in_channels):
                raise ValueError(f"{name} needs 1 or {self.in_channels} values, got {list(values)}")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")

    @property
    def is_unit_range(self) -> bool:
        """True when normalisation is the identity (inputs stay in [0, 1])."""
        return all(m == 0.0 for m in self.mean) and all(s == 1.0 for s in self.std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float ``[n, 1 or C, ...]`` -> model input ``[n, in_channels, ...]``."""
        if x.shape[1] == 1 and self.in_channels != 1:
            x = x.expand(-1, self.in_channels, *x.shape[2:])
        if self.is_unit_range:
            return x
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "scale": "x / 255", "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None, in_channels: int = 1) -> InputSpec:
        """Read what :meth:`to_dict` wrote; ``None`` (files written before the field existed) is
        medcl's default convention with ``in_channels``."""
        if not value:
            return cls(in_channels=in_channels)
        return cls(in_channels=int(value.get("in_channels", in_channels)),
                   mean=tuple(value.get("mean", (0.0,))), std=tuple(value.get("std", (1.0,))))

    def describe(self) -> str:
        """One sentence for model cards and reports."""
        text = "grayscale frames as float x / 255 in [0, 1]"
        if self.in_channels > 1:
            text += f", replicated to {self.in_channels} channels"
        if not self.is_unit_range:
            text += f", then (x - mean) / std with mean {list(self.mean)} and std {list(self.std)}"
        return text


DEFAULT_INPUT = InputSpec()


def unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 -> float ``x / 255`` in [0, 1]; float input is taken to be in [0, 1] already."""
    return frames.float().div(255.0) if frames.dtype == torch.uint8 else frames.float()


def to_model_input(frames: torch.Tensor, spec: InputSpec = DEFAULT_INPUT) -> torch.Tensor:
    """uint8 (or [0, 1] float) frames ``[n, 1, H, W]`` -> the backbone's input tensor."""
    if frames.ndim < 3:
        raise ValueError(f"expected frames [n, 1, H, W], got shape {tuple(frames.shape)}")
    return spec.normalize(unit_range(frames))


def resize_frames(frames: torch.Tensor | Sequence[Any], size: int) -> torch.Tensor:
    """uint8 frames ``[n, H, W]`` (tensor, array or list of [H, W] arrays) -> uint8 ``[n, 1, size, size]``.

    Bilinear with antialiasing (a frame shrunk 4x keeps its speckle statistics), then rounded back
    to uint8, so the stored copy and every later use of it agree to the bit.
    """
    if not isinstance(frames, torch.Tensor):  # frames may differ in size: resize one by one
        import numpy as np

        if not len(frames):
            return torch.zeros((0, 1, size, size), dtype=torch.uint8)
        return torch.cat([resize_frames(torch.from_numpy(np.ascontiguousarray(np.asarray(f)))[None], size)
                          for f in frames])
    if frames.dtype != torch.uint8 or frames.ndim != 3:
        raise ValueError(f"expected uint8 frames [n, H, W], got {frames.dtype} {tuple(frames.shape)}")
    x = frames.unsqueeze(1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x
