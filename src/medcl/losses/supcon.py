"""Label-aware contrastive loss (SupCon-style) for semi-supervised USCL.

Reference: Khosla et al., "Supervised contrastive learning", NeurIPS 2020 (L^sup_out); USCL
(Chen et al., MICCAI 2021) notes that samples with different labels are negatives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medcl.losses.ntxent import view_similarity_logits
from medcl.distributed import gather_no_grad

UNLABELED = -1


class SupConLoss(nn.Module):
    """Contrastive loss where views of the same pair AND of other pairs with the same known label
    are positives; everything else (different labels, unlabeled others) is a negative.

    ``labels`` [N] holds class indices, ``-1`` for unlabeled pairs (an unknown label never matches
    anything, not even another ``-1``). For view i with positive set P(i) (never empty: its pair
    partner is always in it):
    ``l_i = -1/|P(i)| sum_{p in P(i)} log exp(s_ip/tau) / sum_{k != i} exp(s_ik/tau)``.
    With all labels ``-1`` this is exactly :class:`~medcl.losses.ntxent.NTXentLoss`.

    >>> loss = SupConLoss(temperature=0.5)
    >>> float(loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 0, -1, 1]))) > 0
    True
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor, labels: Tensor) -> Tensor:
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(f"expected two [N, D] tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        if labels.shape != (z1.shape[0],):
            raise ValueError(f"labels must have shape ({z1.shape[0]},), got {tuple(labels.shape)}")
        n = z1.shape[0]
        logits, self_index, total = view_similarity_logits(z1, z2, self.temperature, self.gather_distributed)
        all_labels = gather_no_grad(labels) if self.gather_distributed else labels
        rows = torch.arange(2 * n, device=logits.device)

        pair_id = torch.arange(total, device=logits.device).repeat(2)
        anchor_pair = pair_id[self_index]
        anchor_label = all_labels[self_index % total]
        cand_label = all_labels.repeat(2)
        same_pair = anchor_pair[:, None] == pair_id[None, :]
        same_label = (anchor_label[:, None] == cand_label[None, :]) & (anchor_label[:, None] != UNLABELED)
        positive = same_pair | same_label
        positive[rows, self_index] = False

        is_self = torch.zeros_like(positive)
        is_self[rows, self_index] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        log_prob = log_prob.masked_fill(~positive, 0.0)  # also removes the -inf self entries
        per_anchor = -log_prob.sum(dim=1) / positive.sum(dim=1).clamp(min=1)
        return per_anchor.mean()
