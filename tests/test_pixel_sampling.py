"""Boundary-distance weighted pixel sampling and label pooling to the token grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcl.sampling.pixels import (
    IGNORE_INDEX,
    boundary_distance,
    boundary_weight,
    gather_tokens,
    labels_to_grid,
    sample_pixels,
    sampling_weights,
)


def disk(size=41, radius=15.0):
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    return ((yy - c) ** 2 + (xx - c) ** 2 <= radius**2).astype(np.int64)


def test_boundary_distance_small_square():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True  # 5x5 square: boundary ring D=0, next ring D=1, centre D=2
    d = boundary_distance(mask)
    assert d[1, 1] == 0 and d[1, 3] == 0 and d[5, 5] == 0
    assert d[2, 2] == pytest.approx(1.0) and d[2, 3] == pytest.approx(1.0)
    assert d[3, 3] == pytest.approx(2.0)
    assert d[0, 0] == 0  # outside


def test_boundary_weight_formula_and_peak():
    d = np.array([0.0, 1.0, 4.0, 8.0, 40.0])
    expected = 0.5 * np.sqrt(d) * np.exp(-d / 8.0) + 0.05
    np.testing.assert_allclose(boundary_weight(d), expected)
    np.testing.assert_allclose(boundary_weight(torch.tensor(d)).numpy(), expected)
    grid = np.linspace(0, 40, 4001)
    assert grid[np.argmax(boundary_weight(grid))] == pytest.approx(4.0, abs=0.01)  # peak at D = mu / 2


def test_image_border_is_not_a_boundary_and_full_grid_is_uniform():
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[:, 3:] = 1
    d = boundary_distance(labels == 1)
    assert d[0, 3] == 0 and d[0, 5] == pytest.approx(2.0)  # distance to the class edge, not the border
    w = sampling_weights(np.ones((4, 4), dtype=np.int64))
    assert np.all(w == 1.0)
    w = sampling_weights(np.full((3, 3), IGNORE_INDEX))
    assert np.all(w == 0)


@pytest.mark.parametrize("replacement", [True, False])
def test_sampler_empirical_distribution_matches_w_on_a_disk(replacement):
    """Chi-square goodness of fit of the sampled distance bins against W (fixed seed)."""
    labels = disk()
    fg = labels == 1
    d = boundary_distance(fg)[fg]
    w = boundary_weight(d)
    bins = np.digitize(d, [0.5, 2.5, 4.5, 6.5, 9.5, 12.5])  # D bins inside the disk
    expected_p = np.bincount(bins, weights=w, minlength=7) / w.sum()
    g = torch.Generator().manual_seed(0)
    t = torch.from_numpy(labels)[None]
    flat_fg = np.flatnonzero(fg.reshape(-1))
    pos_of = {int(p): k for k, p in enumerate(flat_fg)}
    draws = []
    copies = 200  # one call samples 200 independent copies of the disk
    per_image = labels.size
    for _ in range(2 if replacement else 20):
        s = sample_pixels(t.expand(copies, -1, -1), budget=10 if replacement else 1, generator=g, replacement=replacement)
        draws += [pos_of[int(i) % per_image] for i, lab in zip(s.index, s.label) if lab == 1]
    assert len(draws) == 4000
    counts = np.bincount(bins[np.array(draws)], minlength=7)
    n = counts.sum()
    chi2 = (((counts - n * expected_p) ** 2) / (n * expected_p)).sum()
    tv = 0.5 * np.abs(counts / n - expected_p).sum()
    assert chi2 < 22.5, (counts, n * expected_p)  # 6 dof, p = 0.001
    assert tv < 0.03
    # and the distribution is clearly not uniform over pixels (uniform TV is much larger)
    uniform_p = np.bincount(bins, minlength=7) / bins.size
    assert 0.5 * np.abs(uniform_p - expected_p).sum() > 0.1


def test_budget_per_class_per_sample_and_ignore():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6] = 3
    labels[1, :, :4] = IGNORE_INDEX
    labels[1, 0, 7] = 2  # one pixel of class 2: taken whole
    s = sample_pixels(labels, budget=5, generator=torch.Generator().manual_seed(1))
    for b, cls, want in [(0, 0, 5), (0, 3, 5), (1, 0, 5), (1, 2, 1)]:
        assert int(((s.sample == b) & (s.label == cls)).sum()) == want
    assert not (s.label == IGNORE_INDEX).any()
    flat = labels.reshape(-1)
    assert torch.equal(flat[s.index], s.label)  # indices point at pixels of that label
    assert len(set(s.index.tolist())) == len(s.index)  # without replacement: no repeats
    feats = torch.arange(2 * 4 * 64, dtype=torch.float).reshape(2, 4, 8, 8)
    picked = gather_tokens(feats, s)
    b, r = divmod(int(s.index[0]), 64)
    assert torch.equal(picked[0], feats[b, :, r // 8, r % 8])


def test_labels_to_grid_majority_nearest_ties_ignore():
    lab = torch.zeros(1, 4, 4, dtype=torch.long)
    lab[0, 0:2, 0:2] = torch.tensor([[1, 1], [1, 0]])  # majority 1
    lab[0, 0:2, 2:4] = torch.tensor([[2, 2], [0, 0]])  # tie 2 vs 0 -> larger id 2
    lab[0, 2:4, 0:2] = IGNORE_INDEX  # all ignored -> ignored
    lab[0, 2:4, 2:4] = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 0]])  # ignore has no vote
    grid = labels_to_grid(lab, (2, 2))
    assert grid.tolist() == [[[1, 2], [IGNORE_INDEX, 0]]]
    near = labels_to_grid(lab, (2, 2), mode="nearest")
    assert near.tolist() == [[[0, 0], [IGNORE_INDEX, 0]]]  # centre pixel (1, 1) of each block
    # "foreground": a class covering >= min_fraction of a token wins over a background majority
    small = torch.zeros(1, 4, 4, dtype=torch.long)
    small[0, 0, 0] = 3  # 1/4 of the top-left token
    small[0, 0, 2:4] = torch.tensor([1, 2])  # two classes at 1/4 each: the larger id
    small[0, 2, 2] = 1
    small[0, 3, 3] = IGNORE_INDEX  # 1 of 3 labelled pixels
    assert labels_to_grid(small, (2, 2), "foreground", 0.25).tolist() == [[[3, 2], [0, 1]]]
    assert labels_to_grid(small, (2, 2), "foreground", 0.4).tolist() == [[[0, 0], [0, 0]]]
    assert labels_to_grid(small, (2, 2), "majority").tolist() == [[[0, 0], [0, 0]]]
    lab3 = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    lab3[0, :2, :2, :2] = 5
    assert labels_to_grid(lab3, (2, 2, 2))[0, 0, 0, 0] == 5
    with pytest.raises(ValueError, match="multiple"):
        labels_to_grid(lab, (3, 3))
