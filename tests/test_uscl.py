import pytest
import torch

from medcl.methods.simclr import SimCLR
from medcl.methods.supervised import Supervised
from medcl.methods.uscl import USCL
from medcl.models.heads import LinearClassifier, ProjectionHead


def batch(n=4, size=32, channels=1, labels=(0, -1, 2, -1)):
    g = torch.Generator().manual_seed(0)
    return {"view1": torch.rand(n, channels, size, size, generator=g), "view2": torch.rand(n, channels, size, size, generator=g),
            "label": torch.tensor(labels), "video": torch.arange(n)}


def test_heads():
    head = ProjectionHead(512, 512, 256)
    assert head(torch.randn(3, 512)).shape == (3, 256)
    assert isinstance(head[1], torch.nn.ReLU) and len(head) == 3
    assert LinearClassifier(512, 3)(torch.randn(2, 512)).shape == (2, 3)
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(512, 512, 0)


def test_uscl_loss_is_contrast_plus_weighted_supervision():
    torch.manual_seed(0)
    method = USCL(["a", "b", "c"], lambda_sup=0.2)
    out = method.training_step(batch())
    assert set(out) >= {"loss", "loss_con", "loss_sup"}
    assert out["loss"].item() == pytest.approx((out["loss_con"] + 0.2 * out["loss_sup"]).item(), rel=1e-6)
    assert float(out["loss_sup"]) > 0
    out["loss"].backward()
    assert method.classifier.weight.grad.abs().sum() > 0
    assert method.backbone.conv1.weight.grad.abs().sum() > 0


def test_unlabeled_batch_trains_contrast_only():
    torch.manual_seed(0)
    method = USCL(["a", "b"], lambda_sup=0.2)
    out = method.training_step(batch(labels=(-1, -1, -1, -1)))
    assert out["loss_sup"].item() == 0.0 and out["loss"].item() == pytest.approx(out["loss_con"].item())
    out["loss"].backward()
    assert method.classifier.weight.grad is not None and float(method.classifier.weight.grad.abs().sum()) == 0.0
    assert method.projection[0].weight.grad.abs().sum() > 0


def test_label_aware_contrast_and_three_channels():
    torch.manual_seed(0)
    method = USCL(["a", "b", "c"], in_channels=3, label_aware=True)
    out = method.training_step(batch(channels=3, labels=(0, 0, 1, -1)))
    assert torch.isfinite(out["loss"])
    assert method.backbone_info() == {"name": "resnet18", "kwargs": {"in_channels": 3}, "prefix": "backbone.",
                                      "input": {"in_channels": 3, "scale": "x / 255", "mean": [0.0], "std": [1.0]}}


def test_no_classes_means_no_classifier():
    method = USCL([])
    assert method.classifier is None
    assert torch.isfinite(method.training_step(batch(labels=(-1,) * 4))["loss"])


def test_simclr_and_supervised_steps():
    torch.manual_seed(0)
    assert set(SimCLR().training_step(batch())) == {"loss"}
    sup = Supervised(["a", "b", "c"]).training_step(batch(labels=(0, 1, 2, 0)))
    assert sup["loss"].item() > 0 and "train_accuracy" in sup
    with pytest.raises(ValueError, match="at least one class"):
        Supervised([])
