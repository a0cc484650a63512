"""Reconstruction consistency L_recon = ||P - P_hat||^2 (MixCL, Li, Quan, Zhou, Eq. 3).

Mean squared error between the decoder's output and the clean patch, averaged over every voxel
(the paper's squared norm up to a constant; the mean keeps beta = 0.01 meaningful across patch
sizes). Pixels outside the image (padding) can be excluded with ``valid``.

    >>> ReconstructionLoss()(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)).item()
    1.0
"""

from __future__ import annotations

import torch
from torch import nn


class ReconstructionLoss(nn.Module):
    def forward(self, prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        err = (prediction.float() - target.float()) ** 2
        if valid is None:
            return err.mean()
        valid = valid.to(err.dtype).expand_as(err)
        return (err * valid).sum() / valid.sum().clamp_min(1.0)
