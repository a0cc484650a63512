"""Consistency regularisation of the Pi-model and Temporal Ensembling, and their weight ramp-up.

Reference: Laine & Aila, "Temporal ensembling for semi-supervised learning", ICLR 2017, Sec. 2
(squared difference of class probabilities; Gaussian ramp-up exp(-5 (1 - T)^2) over 80 epochs).
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def gaussian_rampup(progress: float) -> float:
    """``exp(-5 (1 - T)^2)`` with ``T = progress`` clipped to [0, 1]: 0.0067 at the start, 1 from ``T = 1`` on."""
    t = min(1.0, max(0.0, float(progress)))
    return math.exp(-5.0 * (1.0 - t) ** 2)


class ConsistencyMSE(nn.Module):
    """Mean over samples and classes of ``(softmax(logits) - target)^2``; ``target`` holds class
    probabilities (with gradient in the Pi-model, where it is the other pass's softmax; a fixed
    ensemble in Temporal Ensembling). ``valid`` [N] (bool) restricts the mean to some samples
    (0, still differentiable, when none is valid).

    >>> import torch
    >>> float(ConsistencyMSE()(torch.zeros(2, 2), torch.full((2, 2), 0.5)))
    0.0
    """

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        if logits.ndim != 2 or target.shape != logits.shape:
            raise ValueError(f"expected logits and target [N, C] of equal shape, got {tuple(logits.shape)} "
                             f"and {tuple(target.shape)}")
        per_sample = (logits.float().softmax(1) - target.float()).pow(2).mean(1)
        if valid is None:
            return per_sample.mean()
        if valid.shape != per_sample.shape:
            raise ValueError(f"expected valid [{len(per_sample)}], got {tuple(valid.shape)}")
        return (per_sample * valid.float()).sum() / valid.sum().clamp_min(1)
