import numpy as np
import pytest
import torch

from medcl.losses.masked_ce import MaskedCrossEntropy
from medcl.losses.ntxent import NTXentLoss
from medcl.losses.supcon import SupConLoss


def ntxent_reference(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """Naive loops over the 2N views, SimCLR's definition."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        partner = (i + n) % n2
        denominator = sum(np.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        total += -np.log(np.exp(z[i] @ z[partner] / tau) / denominator)
    return total / n2


def supcon_reference(z1: np.ndarray, z2: np.ndarray, labels: np.ndarray, tau: float) -> float:
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    lab = np.concatenate([labels, labels])
    pair = np.concatenate([np.arange(len(labels))] * 2)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        denominator = sum(np.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        positives = [k for k in range(n2) if k != i and (pair[k] == pair[i] or (lab[i] >= 0 and lab[k] == lab[i]))]
        total += -np.mean([np.log(np.exp(z[i] @ z[p] / tau) / denominator) for p in positives])
    return total / n2


@pytest.mark.parametrize("n, dim", [(2, 3), (5, 16), (16, 128)])
@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_ntxent_matches_numpy_reference(n, dim, tau):
    rng = np.random.default_rng(n * 100 + dim)
    z1, z2 = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    got = NTXentLoss(temperature=tau)(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32))
    assert float(got) == pytest.approx(ntxent_reference(z1, z2, tau), rel=1e-5, abs=1e-5)


def test_ntxent_is_small_for_aligned_pairs_and_large_for_swapped():
    z = torch.eye(8) * 5
    loss = NTXentLoss(temperature=0.1)
    assert float(loss(z, z)) < 0.01
    assert float(loss(z, z.roll(1, dims=0))) > 5


def test_ntxent_validates_arguments():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(3, 8\)"):
        NTXentLoss()(torch.zeros(4, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        NTXentLoss()(torch.ones(1, 8), torch.ones(1, 8))


@pytest.mark.parametrize("labels", [[0, 1, 0, -1, 2, -1], [-1] * 6, [1] * 6, [0, 1, 2, 0, 1, 2]])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_matches_numpy_reference(labels, tau):
    rng = np.random.default_rng(len(labels))
    z1, z2 = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    got = SupConLoss(tau)(torch.tensor(z1).float(), torch.tensor(z2).float(), torch.tensor(labels))
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(supcon_reference(z1, z2, np.array(labels), tau), rel=1e-5, abs=1e-5)


def test_supcon_without_labels_equals_ntxent_and_has_finite_gradients():
    z1 = torch.randn(5, 7, requires_grad=True)
    z2 = torch.randn(5, 7)
    loss = SupConLoss(0.5)(z1, z2, torch.full((5,), -1))
    assert loss.item() == pytest.approx(NTXentLoss(0.5)(z1, z2).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z1.grad).all()


def test_masked_cross_entropy_ignores_unlabeled():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]], requires_grad=True)
    got = MaskedCrossEntropy()(logits, torch.tensor([0, -1, 1])).detach()
    expected = torch.nn.functional.cross_entropy(logits.detach()[[0, 2]], torch.tensor([0, 1]))
    assert float(got) == pytest.approx(float(expected))
    none = MaskedCrossEntropy()(logits, torch.tensor([-1, -1, -1]))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="targets must be -1 or in"):
        MaskedCrossEntropy()(logits, torch.tensor([0, 2, 1]))
