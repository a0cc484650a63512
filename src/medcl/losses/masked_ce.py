"""Cross-entropy on labeled samples only (USCL's L_sup, Chen et al., MICCAI 2021, Eq. (5)).

Unlabeled samples carry the sentinel ``-1`` (never a fake class) and contribute nothing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

UNLABELED = -1


class MaskedCrossEntropy(nn.Module):
    """Mean cross-entropy over samples whose target is not ``-1``; 0 (still differentiable,
    so every parameter receives a gradient under DDP) when the batch holds no labeled sample.

    >>> import torch
    >>> ce = MaskedCrossEntropy()
    >>> float(ce(torch.zeros(3, 2), torch.tensor([-1, -1, -1])))
    0.0
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"expected logits [N, C] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}")
        known = targets != UNLABELED
        if bool((targets[known] >= logits.shape[1]).any()) or bool((targets[known] < 0).any()):
            raise ValueError(f"targets must be -1 or in [0, {logits.shape[1]}), got {targets.unique().tolist()}")
        if not bool(known.any()):
            return logits.float().sum() * 0.0 + 0.0  # + 0.0: log 0.0, not -0.0
        return F.cross_entropy(logits[known].float(), targets[known], label_smoothing=self.label_smoothing)
