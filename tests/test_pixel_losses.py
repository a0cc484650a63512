"""Pixel-level Barlow Twins and supervised pixel contrast against naive NumPy loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medcl.losses.pixel_barlow import PixelBarlowTwinsLoss
from medcl.losses.pixel_contrast import PixelContrastLoss, pair_masks
from medcl.losses.reconstruction import ReconstructionLoss


# ---------------------------------------------------------------- references (loops, float64)
def barlow_reference(layers1, layers2, lam):
    total = 0.0
    for a, b in zip(layers1, layers2):
        a = a.detach().double().numpy()
        b = b.detach().double().numpy()
        c_dim = a.shape[1]
        za = np.moveaxis(a, 1, -1).reshape(-1, c_dim)  # rows: every position of every image
        zb = np.moveaxis(b, 1, -1).reshape(-1, c_dim)
        m = za.shape[0]
        na = (za - za.mean(0)) / (za.std(0, ddof=1) + 1e-6)
        nb = (zb - zb.mean(0)) / (zb.std(0, ddof=1) + 1e-6)
        for i in range(c_dim):
            for j in range(c_dim):
                cij = sum(na[k, i] * nb[k, j] for k in range(m)) / m
                total += (1 - cij) ** 2 if i == j else lam * cij**2
    return total


def contrast_reference(z, labels, annotated, tau, view=None):
    """-log(sum_pos exp / sum_{pos+neg} exp) per foreground anchor, averaged over anchors with positives."""
    z = z.detach().double().numpy()
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(labels)
    losses = []
    for i in range(n):
        if labels[i] == 0:
            continue  # background is never an anchor
        pos, allv = 0.0, 0.0
        n_pos = 0
        for j in range(n):
            if j == i or (view is not None and view[i] == view[j]):
                continue
            e = math.exp(float(z[i] @ z[j]) / tau)
            if labels[j] == labels[i]:
                pos += e
                allv += e
                n_pos += 1
            elif labels[j] != 0:
                allv += e  # two different foreground classes: negative
            elif annotated is None or annotated[j][labels[i]]:
                allv += e  # background known not to be class labels[i]
            # else: background where labels[i] was not annotated -> ignored
        if n_pos:
            losses.append(-math.log(pos / allv))
    return float(np.mean(losses)) if losses else 0.0


# ---------------------------------------------------------------- pixel Barlow Twins
@pytest.mark.parametrize("lam", [0.0, 5e-3, 0.5])
def test_pixel_barlow_matches_reference_over_layers(lam):
    g = torch.Generator().manual_seed(1)
    layers1 = [torch.randn(2, 5, 3, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)]
    layers2 = [x + 0.5 * torch.randn(x.shape, generator=g) for x in layers1]
    got = PixelBarlowTwinsLoss(lambda_offdiag=lam)(layers1, layers2)
    assert got.item() == pytest.approx(barlow_reference(layers1, layers2, lam), rel=1e-4)


def test_per_layer_term_equals_monai_barlow_twins():
    from monai.losses import BarlowTwinsLoss

    from medcl.losses.pixel_barlow import flatten_positions

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 7, 4, 5, generator=g), torch.randn(3, 7, 4, 5, generator=g)
    for lam in (0.0, 5e-3, 1.0):
        ref = BarlowTwinsLoss(lambd=lam)(flatten_positions(a), flatten_positions(b))
        torch.testing.assert_close(PixelBarlowTwinsLoss(lam)([a], [b]), ref)


def test_pixel_barlow_3d_mean_and_positions_matter():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1, 3, 2, 2, 3, generator=g)
    b = a + 0.1 * torch.randn(a.shape, generator=g)
    loss = PixelBarlowTwinsLoss(1e-2)
    ref = barlow_reference([a, a], [b, b], 1e-2)
    assert loss([a, a], [b, b]).item() == pytest.approx(ref, rel=1e-4)
    assert PixelBarlowTwinsLoss(1e-2, reduction="mean")([a, a], [b, b]).item() == pytest.approx(ref / 2, rel=1e-4)
    # identical views are near the optimum on the diagonal; shuffled positions are not
    shuffled = b.flatten(2)[:, :, torch.randperm(12, generator=g)].reshape(b.shape)
    assert loss([a], [b]) < loss([a], [shuffled])


def test_pixel_barlow_errors_name_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        PixelBarlowTwinsLoss()([torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 3, 2, 2)])
    with pytest.raises(ValueError, match="lambda_offdiag"):
        PixelBarlowTwinsLoss(-1.0)


# ---------------------------------------------------------------- pixel contrast
def _case(seed, n=24, c=6, classes=4, k_total=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    annotated = torch.rand(n, k_total, generator=g) > 0.4
    annotated[:, 0] = True
    return z, labels, annotated


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_pixel_contrast_matches_reference(seed, tau):
    z, labels, annotated = _case(seed)
    got = PixelContrastLoss(temperature=tau)(z, labels, annotated)
    ref = contrast_reference(z, labels.tolist(), annotated.tolist(), tau)
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # annotated=None: background is a confident negative for every class
    got_all = PixelContrastLoss(temperature=tau)(z, labels)
    assert got_all.item() == pytest.approx(contrast_reference(z, labels.tolist(), None, tau), rel=1e-5, abs=1e-6)


def test_pixel_contrast_cross_view_pairs_only():
    z, labels, annotated = _case(7, n=20)
    view = torch.tensor([1] * 10 + [2] * 10)
    got = PixelContrastLoss(0.1)(z, labels, annotated, view)
    assert got.item() == pytest.approx(contrast_reference(z, labels.tolist(), annotated.tolist(), 0.1, view.tolist()), rel=1e-5)


def test_background_pairs_and_unannotated_background_are_ignored():
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 1, 2, 2, 0, 0, 0])
    annotated = torch.ones(7, 3, dtype=torch.bool)
    annotated[6, 1] = False  # pixel 6: background of a sample where class 1 was NOT annotated
    z = torch.randn(7, 5, generator=g)
    loss = PixelContrastLoss(0.1)
    base = loss(z, labels, annotated)
    # moving pixel 6 right onto the class-1 pixels must not change anything for class-1 anchors:
    # it may be an unlabelled class-1 pixel, so it is not a negative for them
    z2 = z.clone()
    z2[6] = z[0]
    positive, negative = pair_masks(labels, annotated)
    assert not negative[0, 6] and not negative[1, 6] and negative[2, 6]  # still a negative for class 2
    assert not negative[4:].any() and not positive[4:].any()  # background is never an anchor
    changed = loss(z2, labels, annotated)
    only_class1 = labels.clone()
    only_class1[2:4] = 0  # without class 2 anchors pixel 6 plays no role at all
    assert loss(z2, only_class1, annotated).item() == pytest.approx(loss(z, only_class1, annotated).item(), rel=1e-6)
    assert changed.item() != pytest.approx(base.item())  # it does matter to class-2 anchors
    # the same pixel with class 1 annotated is a confident negative and the loss goes up
    annotated_all = torch.ones(7, 3, dtype=torch.bool)
    assert loss(z2, only_class1, annotated_all) > loss(z, only_class1, annotated_all)


def test_anchor_without_positive_and_all_background_no_nan():
    loss = PixelContrastLoss(0.1)
    z = torch.randn(4, 3, requires_grad=True)
    # class 1 and 2 appear once each: no anchor has a positive -> exact 0 with a gradient path
    out = loss(z, torch.tensor([1, 2, 0, 0]))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(z.grad).all()
    z.grad = None
    out = loss(z, torch.tensor([0, 0, 0, 0]))
    assert out.item() == 0.0
    # mixed: one anchor pair has positives, a lone class does not; gradients are finite
    out = loss(z, torch.tensor([1, 1, 2, 0]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    ref = contrast_reference(z, [1, 1, 2, 0], None, 0.1)
    assert out.item() == pytest.approx(ref, rel=1e-5)


def test_pixel_contrast_pulls_same_class_together():
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    good = PixelContrastLoss(0.1)(z, torch.tensor([1, 1, 2, 2]))
    bad = PixelContrastLoss(0.1)(z, torch.tensor([1, 2, 1, 2]))
    assert good < bad


def test_pixel_contrast_validates():
    with pytest.raises(ValueError, match="temperature"):
        PixelContrastLoss(0.0)
    with pytest.raises(ValueError, match="labels"):
        PixelContrastLoss()(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="annotated"):
        PixelContrastLoss()(torch.zeros(3, 2), torch.tensor([1, 2, 3]), torch.ones(3, 2, dtype=torch.bool))


def test_reconstruction_loss():
    pred, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert ReconstructionLoss()(pred, target).item() == pytest.approx(1.0)
    valid = torch.zeros(2, 1, 4, 4)
    valid[:, :, :2] = 1
    pred[:, :, 2:] = 5.0
    assert ReconstructionLoss()(pred, target, valid).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        ReconstructionLoss()(pred, target[:, :, :2])
