"""Supervised pixel contrast with ignored background pairs: MixCL's label consistency L_label.

Li, Quan, Zhou, "MixCL", Sec. 2.3.2, Eq. 6 (pixel contrast as in Wang et al., ICCV 2021).
For each foreground anchor pixel i among the sampled pixels (of both patches P1 and P2),

    l_i = -log( sum_{j in Pos(i)} exp(cos(z_i, z_j) / tau) / sum_{j in Pos(i) u Neg(i)} exp(cos(z_i, z_j) / tau) )

and L_label is the mean of l_i over the anchors that have at least one positive (an anchor
without a positive contributes nothing; no anchor at all gives an exact, differentiable 0).

Pair rules (label 0 means "background OR a class this sample's source did not annotate"):

- same foreground class: positive;
- two different foreground classes: negative (paper: different labels are negatives);
- foreground class c vs a label-0 pixel j: negative ONLY if c was annotated for j's sample, since
  only then is j known not to be c; otherwise ignored, so an unannotated organ never acts as
  background;
- label-0 vs label-0: ignored (background of one dataset may hold another dataset's organs), and
  label-0 pixels are never anchors;
- a pixel is never paired with itself; ``view`` optionally restricts pairs to different patches.

Example::

    >>> loss = PixelContrastLoss(temperature=0.1)
    >>> z = torch.randn(6, 16); labels = torch.tensor([1, 1, 2, 2, 0, 0])
    >>> float(loss(z, labels)) > 0
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pair_masks(
    labels: torch.Tensor, annotated: torch.Tensor | None = None, view: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[N, N]`` masks (positive, negative) for anchors in rows; see the module docstring.

    ``annotated``: ``[N, K + 1]`` bool, row j = which global classes the source of pixel j
    annotated (column 0 unused). None: every class counts as annotated for every pixel.
    """
    labels = labels.long()
    n = labels.shape[0]
    fg = labels > 0
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    if view is not None:
        not_self = not_self & (view[:, None] != view[None, :])
    anchor = fg[:, None]
    positive = anchor & same & not_self
    negative_fg = anchor & fg[None, :] & ~same
    if annotated is None:
        knows = torch.ones(n, n, dtype=torch.bool, device=labels.device)
    else:
        if annotated.dim() != 2 or annotated.shape[0] != n:
            raise ValueError(f"annotated must be [N={n}, K+1], got {tuple(annotated.shape)}")
        if n and int(labels.max()) >= annotated.shape[1]:
            raise ValueError(f"label {int(labels.max())} has no column in annotated of width {annotated.shape[1]}")
        # knows[i, j]: was anchor i's class annotated in pixel j's sample?
        knows = annotated.bool()[:, labels].T
    negative_bg = anchor & ~fg[None, :] & knows
    negative = (negative_fg | negative_bg) & not_self
    return positive, negative


class PixelContrastLoss(nn.Module):
    """Supervised pixel contrast (cosine similarity, temperature ``tau``), background pairs ignored."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        annotated: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(f"features must be [N, C], got shape {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must be [N={features.shape[0]}], got shape {tuple(labels.shape)}")
        positive, negative = pair_masks(labels, annotated, view)
        has_positive = positive.any(1)
        if not bool(has_positive.any()):
            return features.sum() * 0.0
        with torch.autocast(device_type=features.device.type, enabled=False):  # logits / 0.1 in float32
            z = F.normalize(features.float(), dim=1)
            logits = z[has_positive] @ z.T / self.temperature
        pos, valid = positive[has_positive], (positive | negative)[has_positive]
        neg_inf = torch.finfo(logits.dtype).min
        log_pos = torch.logsumexp(logits.masked_fill(~pos, neg_inf), dim=1)
        log_all = torch.logsumexp(logits.masked_fill(~valid, neg_inf), dim=1)
        return (log_all - log_pos).mean()
