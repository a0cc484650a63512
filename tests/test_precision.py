"""Mixed precision (medcl.precision): what `auto` picks, that channels_last changes no value, and
that bf16 training tracks fp32 within stated tolerances (pretraining losses, fine-tuned probabilities)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medcl import precision
from medcl.models.backbones import resnet18_backbone

PROJECT = Path(__file__).resolve().parents[1]
# bf16 keeps 8 bits of mantissa: after a few steps, losses agree to a few percent
LOSS_RTOL = 0.05
PROB_ATOL = 0.05


def test_auto_uses_bf16_only_where_native(monkeypatch):
    precision.cpu_bf16_flags.cache_clear()
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert precision.resolve_precision("auto", "cpu") is None
    assert precision.resolve_precision("bf16", "cpu") is torch.bfloat16
    assert precision.resolve_precision("fp32", "cpu") is None
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert precision.resolve_precision("auto", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="precision='fp16'"):
        precision.resolve_precision("fp16", "cpu")


def test_auto_keeps_networks_that_prefer_fp32_in_fp32(monkeypatch):
    from medcl.models.unet import build_unet

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    unet2d, unet3d = build_unet(out_channels=2), build_unet(out_channels=2, spatial_dims=3)
    assert precision.resolve_precision("auto", "cpu", unet2d) is torch.bfloat16
    assert precision.resolve_precision("auto", "cpu", unet3d) is None  # measured: no gain from bf16 in 3D
    assert precision.resolve_precision("bf16", "cpu", unet3d) is torch.bfloat16  # still forced when asked


def test_channels_last_changes_no_value():
    torch.manual_seed(0)
    net = resnet18_backbone().eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        plain = net(x)
        fast = precision.channels_last(net)(precision.channels_last(x))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    # 3D: channels_last_3d for the 3D U-Net and 5D tensors, same values
    from medcl.models.unet import build_unet

    net3 = build_unet(out_channels=2, spatial_dims=3).eval()
    x3 = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        plain3 = net3(x3)
        net3 = precision.channels_last(net3)
        assert net3.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert precision.channels_last(x3).is_contiguous(memory_format=torch.channels_last_3d)
        fast3 = net3(precision.channels_last(x3))
    torch.testing.assert_close(fast3, plain3, rtol=1e-4, atol=1e-4)


def _pretrain_losses(tmp_path, frames, mode: str) -> list[float]:
    from medcl.train.api import pretrain
    from uscl_fixtures import tiny_overrides

    out = tmp_path / mode
    pretrain(PROJECT / "configs/uscl.yaml", tiny_overrides(frames, out, **{"train.precision": mode}))
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_pretraining_tracks_fp32(tmp_path):
    from uscl_fixtures import write_frame_sets

    frames = write_frame_sets(tmp_path / "frames", n_videos=12)
    fp32, bf16 = _pretrain_losses(tmp_path, frames, "fp32"), _pretrain_losses(tmp_path, frames, "bf16")
    assert len(fp32) == len(bf16) == 6
    np.testing.assert_allclose(bf16, fp32, rtol=LOSS_RTOL)
    environment = json.loads((tmp_path / "bf16" / "environment.json").read_text())
    assert "cpu_native_bf16" in environment
    # what the run actually used is recorded beside what the machine offers
    assert environment["precision"] == "bfloat16" and environment["device"] == "cpu"
    assert json.loads((tmp_path / "fp32" / "environment.json").read_text())["precision"] == "fp32"


def test_bf16_finetuning_tracks_fp32(tmp_path):
    from medcl.evaluate.classify import FinetuneConfig, finetune
    from tiny_frames import make_frame_sets

    data = make_frame_sets(tmp_path / "frames", n_patients=6, n_frames=3)
    probs = {}
    for mode in ("fp32", "bf16"):
        config = FinetuneConfig(protocol="last_stage", epochs=2, image_size=32, folds=3, repeats=1, batch_size=16,
                                precision=mode, save_models=False)
        finetune(data, ["scratch"], config, tmp_path / mode, log=lambda *_: None)
        rows = (tmp_path / mode / "predictions.csv").read_text().splitlines()
        header = rows[0].split(",")
        cols = [i for i, h in enumerate(header) if h.startswith("prob_")]
        probs[mode] = np.array([[float(r.split(",")[i]) for i in cols] for r in rows[1:]])
    np.testing.assert_allclose(probs["bf16"], probs["fp32"], atol=PROB_ATOL)


@pytest.mark.parametrize("name, extra", [("adam", {}), ("adamw", {}), ("sgd", {"momentum": 0.9})])
def test_make_optimizer_is_fused_and_follows_the_plain_update(name, extra):
    """The fused update (one kernel over all tensors) follows the per-tensor loop of the same
    optimiser step for step, weight decay included."""
    from medcl.precision import OPTIMIZERS, make_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    twin, start = copy.deepcopy(net), copy.deepcopy(net)
    fused = make_optimizer(name, net.parameters(), lr=0.05, weight_decay=0.01, **extra)
    plain = OPTIMIZERS[name](twin.parameters(), lr=0.05, weight_decay=0.01, foreach=False, **extra)
    assert fused.defaults.get("fused") is True and not plain.defaults.get("fused")
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        for model, opt in ((net, fused), (twin, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(net[0].weight, start[0].weight, atol=1e-3)  # the steps did move the weights


def test_make_optimizer_refuses_unknown_names_and_falls_back_off_cpu_and_cuda():
    from medcl.precision import make_optimizer

    with pytest.raises(ValueError, match="optimizer 'lamb': choose one of adam, adamw, sgd"):
        make_optimizer("lamb", [torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    meta = make_optimizer("adam", [torch.nn.Parameter(torch.zeros(2, device="meta"))], lr=0.1)
    assert not meta.defaults.get("fused")
