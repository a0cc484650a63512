"""NT-Xent: normalised temperature-scaled cross-entropy (SimCLR; multi-class N-pair loss).

References: Sohn, "Improved deep metric learning with multi-class N-pair loss objective",
NeurIPS 2016; Chen et al., "A simple framework for contrastive learning of visual
representations" (SimCLR), ICML 2020; USCL (Chen et al., MICCAI 2021) Eq. (3)-(4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.distributed import gather_with_grad, rank_and_world


def view_similarity_logits(z1: Tensor, z2: Tensor, temperature: float, gather_distributed: bool) -> tuple[Tensor, Tensor, int]:
    """Cosine similarities / temperature between this rank's 2N views (anchors: z1 then z2) and
    every view (candidates: all ranks' z1 then z2 when ``gather_distributed``, through an
    all-gather that keeps gradients). Returns ``(logits [2N, 2T], self_index [2N], T)`` where T is
    the number of pairs over all ranks and ``self_index`` the column of each anchor itself."""
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    all1, all2, offset = z1, z2, 0
    if gather_distributed:
        rank, _ = rank_and_world()
        all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
        offset = rank * n
    total = all1.shape[0]
    logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature
    local = torch.arange(n, device=z1.device) + offset
    return logits, torch.cat([local, local + total]), total


class NTXentLoss(nn.Module):
    """Contrastive loss over the 2N views of N positive pairs, cosine similarity / temperature.

    For view i with partner p(i): ``l_i = -log exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau)``,
    averaged over all 2N views; every view of another pair is a negative (2N - 2 of them).

    With ``gather_distributed=True`` under torch.distributed, the candidates (positives and
    negatives) come from every rank through an all-gather that keeps gradients; each rank averages
    over its own anchors, which DDP's gradient averaging turns into the global mean.

    >>> loss = NTXentLoss(temperature=0.5)
    >>> z1, z2 = torch.randn(8, 256), torch.randn(8, 256)
    >>> float(loss(z1, z2)) > 0
    True
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(f"expected two [N, D] tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        n = z1.shape[0]
        logits, self_index, total = view_similarity_logits(z1, z2, self.temperature, self.gather_distributed)
        if n + total < 3:
            raise ValueError(f"NT-Xent needs at least 2 pairs (one positive and one negative), got {total}")
        positive = torch.cat([self_index[n:], self_index[:n]])  # each view's partner
        rows = torch.arange(2 * n, device=logits.device)
        logits[rows, self_index] = float("-inf")
        return F.cross_entropy(logits, positive)
