"""FixMatch's unlabeled loss: confident pseudo-labels of the weak view supervise the strong view.

Reference: Sohn et al., "FixMatch: Simplifying semi-supervised learning with consistency and
confidence", NeurIPS 2020, Eq. (2) (threshold tau = 0.95).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PseudoLabelLoss(nn.Module):
    """``l_u = 1/(mu B) sum_b 1[max(p_b) >= tau] H(argmax(p_b), softmax(logits_strong_b))`` with
    ``p_b = softmax(logits_weak_b)`` held fixed (no gradient through the pseudo-label).

    Returns ``(loss, mask)``: the mean over ALL unlabeled samples (masked ones count as 0, as in the
    paper) and the float mask of the samples that passed the threshold.

    >>> import torch
    >>> loss, mask = PseudoLabelLoss(0.95)(torch.tensor([[9.0, 0.0], [0.1, 0.0]]), torch.zeros(2, 2))
    >>> mask.tolist(), round(float(loss), 4)
    ([1.0, 0.0], 0.3466)
    """

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def forward(self, logits_weak: Tensor, logits_strong: Tensor) -> tuple[Tensor, Tensor]:
        if logits_weak.ndim != 2 or logits_strong.shape != logits_weak.shape:
            raise ValueError(f"expected two [N, C] logits of equal shape, got {tuple(logits_weak.shape)} "
                             f"and {tuple(logits_strong.shape)}")
        confidence, pseudo_label = logits_weak.detach().float().softmax(1).max(1)
        mask = (confidence >= self.threshold).float()
        per_sample = F.cross_entropy(logits_strong.float(), pseudo_label, reduction="none")
        return (per_sample * mask).mean(), mask
