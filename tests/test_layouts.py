"""Weight layouts: medcl's MONAI ResNet-18 <-> torchvision / timm resnet18, checked against an
independent plain-PyTorch ResNet-18 with torchvision's module names and a fixture of torchvision's
key names and shapes (torchvision itself cannot be installed beside this CPU torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from medcl.models.backbones import resnet18_backbone
from medcl.models.layouts import LayoutError, adapt_conv1, monai_to_torchvision, torchvision_to_monai

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_resnet18_state_dict.json"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class PlainResNet18(nn.Module):
    """He et al. 2016, written the way torchvision names it (independent of MONAI and of medcl)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = [64, 128, 256, 512], 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _trained_like(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and shortcut biases, so that folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                if "running_var" in name:
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif "running_mean" in name or name.endswith("bias"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net


def test_fixture_is_torchvision_resnet18():
    fixture = json.loads(FIXTURE.read_text())
    plain = {k: list(v.shape) for k, v in PlainResNet18().state_dict().items()}
    assert plain == fixture and len(fixture) == 122  # torchvision resnet18: 62 parameters + 60 BatchNorm buffers


def test_export_layout_matches_torchvision_and_computes_the_same_features():
    torch.manual_seed(0)
    ours = _trained_like(resnet18_backbone(), 1).eval()
    converted = monai_to_torchvision(ours.state_dict())
    fixture = json.loads(FIXTURE.read_text())
    expected = {k: v for k, v in fixture.items() if not k.startswith("fc.")}
    expected["conv1.weight"] = [64, 1, 7, 7]
    assert {k: list(v.shape) for k, v in converted.items()} == expected
    plain = PlainResNet18(in_channels=1)
    plain.fc = nn.Identity()
    plain.load_state_dict(converted, strict=True)
    x = torch.rand(3, 1, 64, 64)
    torch.testing.assert_close(plain.eval()(x), ours(x), rtol=1e-5, atol=1e-5)
    # 3 input channels: a gray image replicated to RGB gives the 1-channel network's features
    rgb = PlainResNet18()
    rgb.fc = nn.Identity()
    rgb.load_state_dict(monai_to_torchvision(ours.state_dict(), in_channels=3), strict=True)
    torch.testing.assert_close(rgb.eval()(x.repeat(1, 3, 1, 1)), ours(x), rtol=1e-4, atol=1e-5)


def test_bias_folding_leaves_training_gradients_unchanged():
    torch.manual_seed(2)
    ours = _trained_like(resnet18_backbone(), 3).train()
    plain = PlainResNet18(in_channels=1)
    plain.fc = nn.Identity()
    plain.load_state_dict(monai_to_torchvision(ours.state_dict()), strict=True)
    plain.train()
    x = torch.rand(4, 1, 64, 64)
    target = torch.randn(4, 512)
    for net in (ours, plain):
        ((net(x) - target) ** 2).mean().backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, dict(ours.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
    # the running statistics moved consistently: folding them again gives the plain network's
    after = monai_to_torchvision(ours.state_dict())
    for name, t in plain.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(after[name], t, rtol=1e-5, atol=1e-6)


def test_import_from_torchvision_layout_folds_rgb_to_gray():
    torch.manual_seed(4)
    plain = _trained_like(PlainResNet18(), 5).eval()
    state = torchvision_to_monai(plain.state_dict())
    ours = resnet18_backbone()
    ours.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 64, 64)
    plain.fc = nn.Identity()
    torch.testing.assert_close(ours.eval()(x), plain(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(LayoutError, match="not a torchvision"):
        torchvision_to_monai(resnet18_backbone().state_dict())
    with pytest.raises(LayoutError, match="cannot adapt"):
        adapt_conv1({"conv1.weight": torch.zeros(64, 3, 7, 7)}, 2)


@pytest.mark.parametrize("kind", ["pth", "pth-wrapped", "safetensors"])
def test_init_from_a_torchvision_state_dict_on_disk(tmp_path, kind):
    """--init imagenet=PATH: a plain torchvision / timm resnet18 state dict (no medcl metadata) is
    folded to gray and recorded as expecting ImageNet normalisation, which the input convention
    applies: the result equals the RGB network fed the replicated, normalised gray image."""
    from safetensors.torch import save_file

    from medcl.inputs import to_model_input
    from medcl.models.layouts import IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD
    from medcl.weights import InitSpec, WeightsError, load_init

    torch.manual_seed(6)
    plain = _trained_like(PlainResNet18(), 7).eval()
    path = tmp_path / ("resnet18.safetensors" if kind == "safetensors" else "resnet18.pth")
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": plain.state_dict()} if kind == "pth-wrapped" else plain.state_dict(), path)
    loaded = load_init(InitSpec.parse(f"imagenet={path}"))
    assert loaded.architecture == "resnet18" and loaded.input.in_channels == 1
    assert loaded.input.mean == IMAGENET_GRAY_MEAN and loaded.input.std == IMAGENET_GRAY_STD
    frames = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    x = to_model_input(frames, loaded.input)
    plain.fc = nn.Identity()
    rgb = ((frames.float() / 255 - 0.449) / 0.226).repeat(1, 3, 1, 1)
    torch.testing.assert_close(loaded.network(x), plain(rgb), rtol=1e-4, atol=1e-5)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsError, match="not in torchvision / timm ResNet-18 layout"):
        load_init(InitSpec.parse(f"x={other}"))


def test_finetuning_from_imagenet_weights_applies_their_normalisation(tmp_path):
    import yaml

    from medcl.evaluate.classify import FinetuneConfig, finetune
    from tiny_frames import make_frame_sets

    torch.manual_seed(8)
    path = tmp_path / "resnet18.pth"
    torch.save(_trained_like(PlainResNet18(), 9).state_dict(), path)
    data = make_frame_sets(tmp_path / "frames", n_patients=6, n_frames=2)
    config = FinetuneConfig(protocol="linear", epochs=1, image_size=32, folds=3, repeats=1, batch_size=16,
                            save_models=False)
    result = finetune(data, [f"imagenet={path}"], config, tmp_path / "ft", log=lambda *_: None)
    assert result["runs"]["imagenet"]["input"]["mean"] == [0.449]
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["input"]["std"] == [0.226]
