"""The README's "Use your weights elsewhere" snippets run as written: against medcl and MONAI for
real, and against stand-ins for torchvision / timm (they cannot be installed beside this CPU torch)
built from the independent plain ResNet-18 of tests/test_layouts.py, with torchvision's names."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from test_layouts import PlainResNet18

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


@pytest.fixture()
def exported(tmp_path, monkeypatch):
    """A USCL-like checkpoint exported in both layouts, in a folder the snippets use as cwd."""
    from medcl.models.backbones import resnet18_backbone
    from medcl.report.model_card import export_backbone
    from medcl.weights import save_checkpoint

    torch.manual_seed(0)
    net = resnet18_backbone()
    ckpt = {"format": "medcl-checkpoint-v1", "method": "uscl", "config": {}, "step": 1, "epoch": 0,
            "model": {f"backbone.{k}": v for k, v in net.state_dict().items()},
            "backbone": {"name": "resnet18", "kwargs": {"in_channels": 1}, "prefix": "backbone."}}
    path = save_checkpoint(tmp_path / "runs" / "uscl" / "checkpoints" / "final.pt", ckpt)
    export_backbone(path, tmp_path / "exported" / "uscl")  # torchvision layout (default for ResNets)
    export_backbone(path, tmp_path / "exported" / "uscl-monai", layout="monai")
    export_backbone(path, tmp_path / "exported" / "uscl-rgb", in_channels=3)
    fake_tv = types.ModuleType("torchvision")
    fake_tv.models = types.SimpleNamespace(resnet18=lambda weights=None: PlainResNet18())
    fake_timm = types.ModuleType("timm")
    fake_timm.create_model = lambda name, pretrained=False, num_classes=1000, in_chans=3: _timm(num_classes, in_chans)
    monkeypatch.setitem(sys.modules, "torchvision", fake_tv)
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.chdir(tmp_path)
    return net.eval()


def _timm(num_classes: int, in_chans: int) -> torch.nn.Module:
    net = PlainResNet18(in_channels=in_chans)
    if num_classes == 0:
        net.fc = torch.nn.Identity()
    return net


def test_weights_elsewhere_snippets_run_and_agree_with_medcl(exported):
    snippets = _snippets("Use your weights elsewhere")
    assert len(snippets) >= 3
    image = torch.rand(2, 1, 64, 64)
    reference = exported(image)
    for code in snippets:
        scope = {"image": image}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
        features = scope["features"]
        torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-5)
