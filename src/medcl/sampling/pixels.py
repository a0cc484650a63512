"""Boundary-weighted pixel sampling for MixCL's label-consistency loss (Li, Quan, Zhou, Sec. 2.3.3).

The pairwise pixel contrast is O(n^2), so only a budget of ``r`` pixels per class and per patch
enters it. Pixels are drawn with probability proportional to

    W(S) = 0.5 * sqrt(D) * exp(-D / mu) + eps,      mu = 8, eps = 0.05,

where D is a pixel's Euclidean distance to the boundary of its own class region: pixels just inside
the boundary are the most informative; boundary pixels (D = 0) and deep interior pixels keep the
floor ``eps``.

Everything happens at the resolution of the layer the loss reads (a ViT token grid: the patch
size times coarser than the image). Labels reach that grid through :func:`labels_to_grid`:

- ``"majority"`` (default): each token takes the most frequent label among its pixels; ignored
  pixels (``IGNORE_INDEX``) do not vote; a token with only ignored pixels is ignored; ties go to
  the larger label id, so a foreground class beats background at a tie.
- ``"nearest"``: each token takes the label of its centre pixel (what nearest-neighbour
  interpolation gives), cheaper but noisier.
- ``"foreground"``: the most frequent foreground class of the token if it covers at least
  ``min_fraction`` of the token's labelled pixels, else the majority rule. For structures smaller
  than a token (a 16^3 token of 4 mm CT spans 64 mm: no head-and-neck organ is a majority
  there), majority pooling leaves no foreground at all and the label loss has no anchors.

Boundary convention: a class's boundary pixels are its pixels with a 4- (6- in 3D) connected
neighbour of another label; the image border is not a boundary (a region cut by the crop does not
have an edge there). A class with no boundary pixel (it fills the whole grid) is sampled uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medcl.data.segtypes import IGNORE_INDEX


def boundary_distance(mask: np.ndarray) -> np.ndarray:
    """Distance (in pixels) of each pixel of ``mask`` to the boundary of the region; 0 outside.

    ``mask`` is a boolean 2D or 3D array. Boundary pixels are mask pixels with a face neighbour
    outside the mask (the image border does not count); they get D = 0. Returns float64 with
    ``inf`` inside a mask that has no boundary pixel at all.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got shape {mask.shape}")
    interior = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=1)
    boundary = mask & ~interior
    if not boundary.any():
        return np.where(mask, np.inf, 0.0)
    # distance_transform_edt measures the distance to the nearest zero: zeros on the boundary
    dist = ndimage.distance_transform_edt(~boundary)
    return np.where(mask, dist, 0.0)


def boundary_weight(distance: np.ndarray | torch.Tensor, mu: float = 8.0, eps: float = 0.05):
    """W = 0.5 * sqrt(D) * exp(-D / mu) + eps (paper Eq. 7). Infinite D gives eps."""
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if isinstance(distance, torch.Tensor):
        d = distance.double()
        w = 0.5 * torch.sqrt(d) * torch.exp(-d / mu)
        return torch.nan_to_num(w, nan=0.0) + eps
    d = np.asarray(distance, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        w = 0.5 * np.sqrt(d) * np.exp(-d / mu)
    return np.nan_to_num(w, nan=0.0) + eps


def sampling_weights(labels: np.ndarray, mu: float = 8.0, eps: float = 0.05) -> np.ndarray:
    """Per-pixel weight W computed within each pixel's own class region; 0 on ignored pixels."""
    labels = np.asarray(labels)
    weights = np.zeros(labels.shape, dtype=np.float64)
    for value in np.unique(labels):
        if value == IGNORE_INDEX:
            continue
        mask = labels == value
        dist = boundary_distance(mask)
        if np.isinf(dist[mask]).any():  # no boundary: uniform over the class
            weights[mask] = 1.0
        else:
            weights[mask] = boundary_weight(dist[mask], mu, eps)
    return weights


def labels_to_grid(labels: torch.Tensor, grid: tuple[int, ...], mode: str = "majority",
                   min_fraction: float = 0.25) -> torch.Tensor:
    """Bring an integer label map ``[B, *S]`` to a coarser ``grid`` (``S[i]`` divisible by ``grid[i]``).

    See the module docstring for the ``"majority"``, ``"nearest"`` and ``"foreground"`` rules.
    Labels are ``IGNORE_INDEX`` or >= 0.
    """
    if labels.dim() != len(grid) + 1:
        raise ValueError(f"labels must be [B, *spatial] with {len(grid)} spatial dims, got {tuple(labels.shape)}")
    spatial = tuple(labels.shape[1:])
    if any(s % g for s, g in zip(spatial, grid)):
        raise ValueError(f"label size {spatial} is not a multiple of the grid {tuple(grid)}")
    factors = tuple(s // g for s, g in zip(spatial, grid))
    if mode == "nearest":
        index = [slice(None)] + [slice(f // 2, None, f) for f in factors]
        return labels[tuple(index)].contiguous()
    if mode not in ("majority", "foreground"):
        raise ValueError(f"mode must be 'majority', 'nearest' or 'foreground', got {mode!r}")
    n_values = int(labels.max().clamp(min=0)) + 1
    shifted = labels.long() + 1  # IGNORE_INDEX -> 0, which gets no vote
    one_hot = F.one_hot(shifted, n_values + 1).movedim(-1, 1).float()[:, 1:]  # [B, K, *S]
    pool = F.avg_pool2d if len(grid) == 2 else F.avg_pool3d
    counts = pool(one_hot, kernel_size=factors, stride=factors)  # [B, K, *grid]
    # ties -> larger label id: flip the class axis so argmax's first-max rule picks the largest id
    best = (n_values - 1) - counts.flip(1).argmax(1)
    if mode == "foreground" and n_values > 1:
        fg = counts[:, 1:]
        best_fg = n_values - 1 - fg.flip(1).argmax(1)  # ids 1..n-1, ties -> larger id
        share = fg.amax(1) / counts.sum(1).clamp_min(1e-12)
        best = torch.where(share >= min_fraction, best_fg, best)
    return torch.where(counts.sum(1) > 0, best, torch.full_like(best, IGNORE_INDEX))


@dataclass
class PixelSample:
    """Sampled positions: ``index`` into the flattened ``[B * prod(grid)]`` positions, their
    ``label`` and the ``sample`` (batch row) each came from."""

    index: torch.Tensor
    label: torch.Tensor
    sample: torch.Tensor


def sample_pixels(
    labels: torch.Tensor,
    budget: int,
    mu: float = 8.0,
    eps: float = 0.05,
    generator: torch.Generator | None = None,
    replacement: bool = False,
) -> PixelSample:
    """Draw up to ``budget`` positions per class present in each sample of ``labels [B, *grid]``.

    Probability proportional to :func:`sampling_weights`. Without replacement (default) a class
    with at most ``budget`` positions contributes all of them; otherwise positions are drawn by
    Gumbel top-k, i.e. successive draws proportional to W without replacement (all classes of all
    samples at once). With replacement: ``budget`` independent draws per class.
    Background (label 0) is a class here too: its pixels are the negatives of the contrast.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1).cpu().long()
    per_sample = flat.shape[1]
    weights = torch.from_numpy(np.stack([sampling_weights(lab, mu, eps).reshape(-1) for lab in flat.view(labels.shape).numpy()]))
    valid = flat != IGNORE_INDEX
    position = torch.nonzero(valid.reshape(-1)).squeeze(1)  # flat index into [B * N]
    if position.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return PixelSample(empty, empty.clone(), empty.clone())
    label = flat.reshape(-1)[position]
    sample = position // per_sample
    n_values = int(label.max()) + 1
    group = sample * n_values + label  # one group per (sample, class)
    w = weights.reshape(-1)[position]
    if replacement:
        picks = []
        for g in torch.unique(group).tolist():
            members = torch.nonzero(group == g).squeeze(1)
            picks.append(members[torch.multinomial(w[members], budget, replacement=True, generator=generator)])
        chosen = torch.cat(picks)
    else:
        u = torch.rand(position.numel(), generator=generator, dtype=torch.float64).clamp_min(1e-300)
        keys = torch.log(w) - torch.log(-torch.log(u))  # Gumbel keys: top-k = weighted draws w/o replacement
        # one sort by (group ascending, key descending): keys squeezed into [0, 1) below the group id
        span = (keys.max() - keys.min()).clamp_min(1e-12)
        order = torch.argsort(group.double() + (keys.max() - keys) / (span * 1.0001))
        sorted_group = group[order]
        first = torch.searchsorted(sorted_group, sorted_group, right=False)
        rank = torch.arange(order.numel()) - first
        chosen = order[rank < budget]
    device = labels.device
    return PixelSample(position[chosen].to(device), label[chosen].to(device), sample[chosen].to(device))


def gather_tokens(features: torch.Tensor, sample: PixelSample) -> torch.Tensor:
    """Pick the sampled positions from a feature map ``[B, C, *grid]`` -> ``[N, C]``."""
    channels = features.shape[1]
    flat = features.movedim(1, -1).reshape(-1, channels)
    return flat[sample.index]
