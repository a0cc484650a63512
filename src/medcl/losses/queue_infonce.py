"""InfoNCE against a queue of negatives: MoCo's contrastive loss.

References: He et al., "Momentum contrast for unsupervised visual representation learning", CVPR
2020, Eq. (1); Chen et al., "Improved baselines with momentum contrastive learning" (MoCo v2),
arXiv:2003.04297 (temperature 0.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QueueInfoNCELoss(nn.Module):
    """For query q_i, its positive key k_i and the queue's K keys n_j (all L2-normalised here):

        l_i = -log exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.n_j / tau)),

    averaged over the N queries: a (K + 1)-way classification whose class 0 is the positive.
    No gradient reaches ``key`` or ``queue`` (MoCo's keys come from the momentum encoder).

    >>> loss = QueueInfoNCELoss(temperature=0.2)
    >>> float(loss(torch.randn(4, 16), torch.randn(4, 16), torch.randn(32, 16))) > 0
    True
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, query: Tensor, key: Tensor, queue: Tensor) -> Tensor:
        if query.ndim != 2 or key.shape != query.shape or queue.ndim != 2 or queue.shape[1] != query.shape[1]:
            raise ValueError(f"expected query and key [N, D] and queue [K, D], got {tuple(query.shape)}, "
                             f"{tuple(key.shape)} and {tuple(queue.shape)}")
        q = F.normalize(query.float(), dim=1)
        k = F.normalize(key.detach().float(), dim=1)
        negatives = F.normalize(queue.detach().float(), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
