"""Backbone export (safetensors + model card) and loading: round trip, plain MONAI, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medcl.data.manifest import VideoRecord, write_manifest
from medcl.report.model_card import export_backbone
from medcl.weights import BACKBONE_FILE, BackboneLoadError, CheckpointError, load_backbone, save_backbone
from medcl.models.backbones import resnet18_backbone


def _manifest(root: Path) -> Path:
    (root / "frames").mkdir(parents=True)
    records = []
    for i, label in enumerate(["covid", "covid", "regular", ""]):
        np.save(root / "frames" / f"v{i}.npy", np.zeros((3 + i, 16, 16), dtype=np.uint8))
        records.append(VideoRecord(f"v{i}", f"v{i}.mp4", label, f"p{i // 2}", 30.0, 30, 3 + i, 16, 16))
    write_manifest(root / "manifest.csv", records)
    return root


def _run(root: Path, in_channels: int = 1, results: bool = True) -> Path:
    """A pretraining run folder with a contract checkpoint around a real resnet18_backbone."""
    manifest = _manifest(root / "ingested")
    run = root / "run"
    config = {"method": "uscl", "data": {"manifest": str(manifest), "size": 64}, "optim": {"lr": 3e-4}}
    torch.manual_seed(0)
    backbone = resnet18_backbone(in_channels=in_channels)
    with torch.no_grad():  # non-default BatchNorm statistics, so a lost buffer would show
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    model["projector.0.weight"] = torch.randn(8, 512)
    ckpt = {"format": "medcl-checkpoint-v1", "method": "uscl", "config": config, "model": model, "optimizer": {},
            "scheduler": {}, "step": 7, "epoch": 1, "rng": {},
            "backbone": {"name": "resnet18", "kwargs": {"in_channels": in_channels, "spatial_dims": 2}, "prefix": "backbone."}}
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "final.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if results:
        (run / "results.json").write_text(json.dumps({"summary": {"video": {"accuracy": {"mean": 0.9, "std": 0.02, "n": 5}}}}))
    return run


@pytest.fixture()
def exported(tmp_path) -> tuple[Path, Path]:
    run = _run(tmp_path)
    out = tmp_path / "export"
    export_backbone(run / "checkpoints" / "final.pt", out, layout="monai")  # MONAI's own keys (bit-exact)
    return run, out


def test_default_export_is_torchvision_layout_and_loads_back(tmp_path):
    """ResNets export in torchvision's layout by default; medcl reads it back to the same network
    (the shortcut bias folded into the BatchNorm: equal up to float rounding)."""
    import json

    from safetensors import safe_open

    from medcl.weights import build_pretrained_backbone, load_checkpoint

    run = _run(tmp_path)
    out = tmp_path / "tv"
    file = export_backbone(run / "checkpoints" / "final.pt", out)
    fixture = json.loads((Path(__file__).parent / "fixtures" / "torchvision_resnet18_state_dict.json").read_text())
    with safe_open(str(file), framework="pt") as handle:
        assert handle.metadata()["layout"] == "torchvision"
        shapes = {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}
    expected = {k: v for k, v in fixture.items() if not k.startswith("fc.")}
    expected["conv1.weight"] = [64, 1, 7, 7]
    assert shapes == expected
    reference = build_pretrained_backbone(load_checkpoint(run / "checkpoints" / "final.pt")).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(out)(x), reference(x), rtol=1e-5, atol=1e-5)
    card = (out / "MODEL_CARD.md").read_text()
    assert "torchvision.models.resnet18()" in card and "net.fc = torch.nn.Identity()" in card
    rgb = export_backbone(run / "checkpoints" / "final.pt", tmp_path / "rgb", in_channels=3)
    loaded = load_backbone(rgb)
    assert loaded.conv1.in_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.repeat(1, 3, 1, 1)), reference(x), rtol=1e-4, atol=1e-5)


def test_round_trip_gives_identical_outputs(exported):
    from medcl.weights import build_pretrained_backbone, load_checkpoint

    run, out = exported
    reference = build_pretrained_backbone(load_checkpoint(run / "checkpoints" / "final.pt")).eval()
    x = torch.rand(3, 1, 64, 64)
    for source in (out, out / BACKBONE_FILE, str(out)):
        loaded = load_backbone(source)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), reference(x))
    loaded_state = load_backbone(out).state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded_state[key], value), key


def test_keys_match_plain_monai_resnet_exactly(exported):
    from monai.networks.nets import ResNet
    from safetensors.torch import load_file

    _, out = exported
    plain = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                   n_input_channels=1, conv1_t_stride=2, feed_forward=False)
    state = load_file(str(out / BACKBONE_FILE))
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), load_backbone(out)(x))


def test_metadata_and_model_card(exported):
    from safetensors import safe_open

    run, out = exported
    with safe_open(str(out / BACKBONE_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["architecture"] == "resnet18"
    assert json.loads(metadata["kwargs"]) == {"in_channels": 1, "spatial_dims": 2}
    assert metadata["method"] == "uscl" and len(metadata["sha256"]) == 64
    card = json.loads((out / "model_card.json").read_text())
    assert card["method"] == "uscl" and card["architecture"] == "resnet18"
    assert card["data"]["videos"] == 4 and card["data"]["frames"] == 3 + 4 + 5 + 6
    assert card["data"]["classes"]["covid"] == {"videos": 2, "frames": 7}
    assert card["data"]["classes"]["(unlabeled)"]["videos"] == 1
    assert card["evaluation"][0]["summary"]["video"]["accuracy"]["mean"] == 0.9
    assert card["config"]["optim"]["lr"] == 3e-4
    assert card["n_parameters"] == sum(p.numel() for p in resnet18_backbone().parameters())
    markdown = (out / "MODEL_CARD.md").read_text()
    assert "conv1_t_stride=2, feed_forward=False" in markdown and "load_state_dict" in markdown
    assert "| covid | 2 | 7 |" in markdown and "| video / accuracy | 0.900 ± 0.020 |" in markdown


def test_export_from_run_folder_and_without_results(tmp_path):
    run = _run(tmp_path, in_channels=3, results=False)
    file = export_backbone(run, tmp_path / "out")  # a run folder: picks checkpoints/final.pt
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["evaluation"] == []
    assert "No results.json" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    finetune = tmp_path / "ft"
    finetune.mkdir()
    (finetune / "results.json").write_text(json.dumps({"format": "medcl-classification-v1", "protocol": "last_stage",
                                                        "summary": {"frame": {"macro_f1": {"mean": 0.5, "std": 0.1}}}}))
    export_backbone(run, tmp_path / "out2", [finetune])
    card = json.loads((tmp_path / "out2" / "model_card.json").read_text())
    assert card["evaluation"][0]["protocol"] == "last_stage"
    assert "| frame / macro f1 | 0.500 ± 0.100 |" in (tmp_path / "out2" / "MODEL_CARD.md").read_text()
    with pytest.raises(CheckpointError, match="no results.json"):
        export_backbone(run, tmp_path / "out3", [tmp_path])
    net = load_backbone(file)
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 512)


def test_corrupted_bytes_fail_naming_the_file(exported):
    _, out = exported
    file = out / BACKBONE_FILE
    data = bytearray(file.read_bytes())
    data[-1000] ^= 0xFF  # one flipped byte inside the tensor data
    file.write_bytes(bytes(data))
    with pytest.raises(BackboneLoadError, match="sha256") as info:
        load_backbone(out)
    assert str(file) in str(info.value)
    file.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(BackboneLoadError, match="not a readable safetensors file") as info:
        load_backbone(file)
    assert str(file) in str(info.value)
    file.write_bytes(b"\x00" * 64)  # header garbage
    with pytest.raises(BackboneLoadError, match="not a readable safetensors file"):
        load_backbone(file)


def test_wrong_architecture_fails_with_the_problem(tmp_path):
    three_channel = resnet18_backbone(in_channels=3).state_dict()
    bad_shapes = save_backbone(three_channel, tmp_path / "shapes.safetensors", "resnet18", {"in_channels": 1})
    with pytest.raises(BackboneLoadError, match=r"shape mismatch.*conv1\.weight") as info:
        load_backbone(bad_shapes)
    assert "shapes.safetensors" in str(info.value)

    state = resnet18_backbone().state_dict()
    del state["layer4.1.conv2.weight"]
    state["head.weight"] = torch.zeros(2)
    missing = save_backbone(state, tmp_path / "missing.safetensors", "resnet18", {})
    with pytest.raises(BackboneLoadError, match=r"missing key.*layer4\.1\.conv2\.weight.*unexpected key.*head\.weight"):
        load_backbone(missing)

    unknown = save_backbone(resnet18_backbone().state_dict(), tmp_path / "unknown.safetensors", "vgg99", {})
    with pytest.raises(BackboneLoadError, match=r"unknown\.safetensors.*unknown backbone architecture 'vgg99'"):
        load_backbone(unknown)

    bad_kwargs = save_backbone(resnet18_backbone().state_dict(), tmp_path / "kwargs.safetensors", "resnet18", {"depth": 50})
    with pytest.raises(BackboneLoadError, match=r"kwargs\.safetensors.*cannot build 'resnet18'"):
        load_backbone(bad_kwargs)


def test_plain_safetensors_without_medcl_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in resnet18_backbone().state_dict().items()}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BackboneLoadError, match=r"plain\.safetensors.*'format'"):
        load_backbone(tmp_path / "plain.safetensors")
    with pytest.raises(BackboneLoadError, match="backbone file not found"):
        load_backbone(tmp_path / "nothing_here")


def test_registry_plugs_in_a_builder(tmp_path):
    from medcl.weights import register_backbone_builder

    class Tiny(torch.nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, width, 3)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    from medcl.models.backbones import BACKBONES

    register_backbone_builder("tiny_test_net", Tiny)
    try:  # the registry is global: later tests (test_config) list its names
        net = Tiny(width=6)
        file = save_backbone(net, tmp_path / "tiny.safetensors", "tiny_test_net", {"width": 6})
        loaded = load_backbone(file)
        x = torch.rand(1, 1, 8, 8)
        assert torch.equal(loaded(x), net(x))
    finally:
        BACKBONES.pop("tiny_test_net")


def test_lazy_top_level_loader_and_cli(exported, tmp_path):
    import medcl
    from medcl.cli import main

    run, out = exported
    assert medcl.load_backbone is load_backbone
    assert main(["export", str(run / "checkpoints" / "final.pt"), "-o", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / BACKBONE_FILE).is_file() and (tmp_path / "cli" / "MODEL_CARD.md").is_file()
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert main(["export", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "cli2")]) == 2
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        export_backbone(tmp_path, tmp_path / "cli3")


def test_unetr_encoder_export_loads_in_medcl_and_plain_monai_vit(tmp_path):
    from monai.networks.nets import ViT

    from medcl.models.unetr import build_encoder, encoder_kwargs

    torch.manual_seed(0)
    encoder = build_encoder(spatial_dims=2, img_size=32, in_channels=1, patch_size=8, hidden_size=32, mlp_dim=64,
                            num_layers=2, num_heads=2)
    kwargs = encoder_kwargs(encoder)
    model = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    ckpt = {"format": "medcl-checkpoint-v1", "method": "mixcl", "config": {"method": "mixcl"}, "model": model,
            "optimizer": {}, "scheduler": {}, "step": 3, "epoch": 0, "rng": {},
            "backbone": {"name": "unetr_encoder", "kwargs": kwargs, "prefix": "encoder."}}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "last.pt")
    file = export_backbone(tmp_path / "run", tmp_path / "out")
    loaded = load_backbone(file)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], encoder.eval()(x)[0])
    from safetensors.torch import load_file

    plain = ViT(in_channels=1, img_size=(32, 32), patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                proj_type="conv", classification=False, spatial_dims=2)
    plain.load_state_dict(load_file(str(file)), strict=True)
    markdown = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "ViT(in_channels=1, img_size=(32, 32), patch_size=8" in markdown


# --------------------------------------------------------------------------- reliability: what readers refuse


def _nan_state() -> dict[str, torch.Tensor]:
    state = resnet18_backbone().state_dict()
    state["layer3.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    return state


def test_export_refuses_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    from medcl.cli import main

    run = _run(tmp_path)
    final = run / "checkpoints" / "final.pt"
    ckpt = torch.load(final, weights_only=True)
    ckpt["model"]["backbone.layer1.0.bn1.running_var"][3] = float("inf")
    torch.save(ckpt, final)
    assert main(["export", str(run), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"medcl export: error: {final}: non-finite weights: tensor 'backbone.layer1.0.bn1.running_var' holds "
                   "0 NaN and 1 Inf of 64 values (weights of a diverged training run; use an earlier checkpoint or "
                   "retrain with a lower optim.lr)\n")
    assert not (tmp_path / "out" / BACKBONE_FILE).exists()
    with pytest.raises(BackboneLoadError, match=r"nan\.safetensors: non-finite weights: tensor 'layer3\.1\.conv2\.weight'"):
        save_backbone(_nan_state(), tmp_path / "nan.safetensors", "resnet18", {"in_channels": 1})
    assert not (tmp_path / "nan.safetensors").exists()


@pytest.mark.parametrize("checksum", [False, True])
def test_a_backbone_file_holding_nan_is_refused_with_or_without_checksum(tmp_path, checksum):
    from safetensors.torch import save_file

    from medcl.weights import EXPORT_FORMAT, load_init, read_exported, tensor_digest

    state = {k: v.contiguous() for k, v in _nan_state().items()}
    metadata = {"format": EXPORT_FORMAT, "architecture": "resnet18", "kwargs": json.dumps({"in_channels": 1})}
    if checksum:  # a checksum only proves the bytes are as written: NaN written is NaN read
        metadata["sha256"] = tensor_digest(state)
    file = tmp_path / BACKBONE_FILE
    save_file(state, str(file), metadata=metadata)
    message = rf"{file}: non-finite weights: tensor 'layer3\.1\.conv2\.weight' holds 1 NaN and 0 Inf"
    for read in (load_backbone, read_exported, lambda f: load_init(f"x={f}")):
        with pytest.raises(BackboneLoadError, match=message):
            read(file)


def _backbone_file(path: Path, architecture: str, kwargs: dict, state: dict | None = None) -> Path:
    """A safetensors file with medcl's metadata saying ``architecture(**kwargs)``, whatever it holds."""
    from safetensors.torch import save_file

    from medcl.weights import EXPORT_FORMAT

    state = state if state is not None else {k: v.contiguous() for k, v in resnet18_backbone().state_dict().items()}
    save_file(state, str(path), metadata={"format": EXPORT_FORMAT, "architecture": architecture,
                                          "kwargs": json.dumps(kwargs)})
    return path


@pytest.mark.parametrize("architecture, kwargs, message", [
    ("resnet18", {"in_channels": 10_000_000}, "in_channels=10000000 out of range for 'resnet18': expected whole number(s) from 1 to 64"),
    ("resnet18", {"in_channels": 0}, "in_channels=0 out of range"),
    ("resnet18", {"in_channels": 1.5}, "in_channels=1.5 out of range"),
    ("resnet18", {"in_channels": True}, "in_channels=True out of range"),
    ("unetr_encoder", {"img_size": [96, 100_000]}, "img_size=[96, 100000] out of range for 'unetr_encoder': expected whole number(s) from 1 to 1024"),
    ("unetr_encoder", {"num_layers": 1000}, "num_layers=1000 out of range for 'unetr_encoder': expected whole number(s) from 1 to 48"),
    ("unetr_encoder", {"hidden_size": 65536}, "hidden_size=65536 out of range"),
    ("some_plugin_net", {"in_channels": 4096}, "in_channels=4096 out of range for 'some_plugin_net'"),
])
def test_metadata_kwargs_beyond_bounds_are_refused_before_building(tmp_path, architecture, kwargs, message):
    file = _backbone_file(tmp_path / "big.safetensors", architecture, kwargs)
    with pytest.raises(BackboneLoadError) as info:
        load_backbone(file)
    assert str(info.value).startswith(f"{file}: kwargs {message}")


def test_tensor_shapes_are_checked_before_the_network_is_allocated(tmp_path):
    """kwargs within bounds but not what the tensors say (a 64-channel conv1 for 1-channel weights):
    the network is only ever built on the meta device, which allocates nothing."""
    from medcl.models.backbones import BACKBONES

    devices = []

    def recording_resnet18(**kwargs):
        devices.append(torch.empty(0).device.type)
        return resnet18_backbone(**kwargs)

    BACKBONES["recording_resnet18"] = recording_resnet18
    try:
        file = _backbone_file(tmp_path / "shapes.safetensors", "recording_resnet18", {"in_channels": 64})
        with pytest.raises(BackboneLoadError, match=r"shape mismatch.*conv1\.weight: file \(64, 1, 7, 7\) vs "
                                                    r"recording_resnet18 \(64, 64, 7, 7\)"):
            load_backbone(file)
        assert devices == ["meta"]
        devices.clear()
        good = _backbone_file(tmp_path / "good.safetensors", "recording_resnet18", {"in_channels": 1})
        assert load_backbone(good)(torch.rand(1, 1, 32, 32)).shape == (1, 512)
        assert devices == ["meta", "cpu"]
    finally:
        BACKBONES.pop("recording_resnet18")


def test_a_training_checkpoint_given_to_load_backbone_says_what_it_is(exported, tmp_path):
    run, _ = exported
    final = run / "checkpoints" / "final.pt"
    with pytest.raises(BackboneLoadError) as info:
        load_backbone(final)
    assert str(info.value) == (f"{final}: this is a medcl training checkpoint (method uscl, step 7), not an exported "
                               "backbone: use `medcl export` first (or pass it to --init)")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")  # some other torch.save file
    with pytest.raises(BackboneLoadError, match=r"other\.pt: a PyTorch file \(torch\.save\), not an exported backbone"):
        load_backbone(tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(BackboneLoadError, match=r"legacy\.pt: a PyTorch file"):
        load_backbone(tmp_path / "legacy.pt")


def test_export_refuses_an_existing_export_unless_overwrite(exported, tmp_path, capsys):
    from medcl.cli import main
    from medcl.runfolder import RunFolderError, run_lock

    run, out = exported
    before = (out / BACKBONE_FILE).read_bytes()
    with pytest.raises(RunFolderError, match=r"already holds an export \(backbone\.safetensors, model_card\.json, "
                                             r"MODEL_CARD\.md\); pass --overwrite"):
        export_backbone(run, out)
    assert main(["export", str(run), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medcl export: error: {out}: already holds an export") and err.count("\n") == 1
    assert (out / BACKBONE_FILE).read_bytes() == before
    assert main(["export", str(run), "-o", str(out), "--overwrite"]) == 0
    with run_lock(tmp_path / "busy", "medcl export"):
        assert main(["export", str(run), "-o", str(tmp_path / "busy")]) == 2
    assert "in use by pid" in capsys.readouterr().err
