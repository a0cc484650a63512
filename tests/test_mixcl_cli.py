"""`medcl pretrain` with method mixcl: presets validate, tiny runs train from the CLI, the exported
encoder loads into a segmentation UNETR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medcl.cli import main
from medcl.config import ConfigError, ConfigWarning, load_config
from medcl.weights import (
    backbone_state_dict,
    build_pretrained_backbone,
    load_checkpoint,
    save_checkpoint,
    unetr_from_checkpoint,
)
from conftest import PROJECT_ROOT, shared_subdir
from uscl_fixtures import OLD_DEFAULT_SECTIONS

TINY = ["mixcl.hidden_size=32", "mixcl.mlp_dim=64", "mixcl.num_layers=2", "mixcl.num_heads=2",
        "mixcl.feature_size=4", "mixcl.pixel_budget=4", "train.progress=false", "train.tensorboard=false"]


def test_presets_validate_with_paper_defaults():
    for name, dims in [("mixcl-2d.yaml", 2), ("mixcl-3d.yaml", 3)]:
        cfg = load_config(PROJECT_ROOT / "configs" / name)
        p = cfg.params
        assert cfg.method == "mixcl" and p.spatial_dims == dims
        assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 1e-4)
        assert (p.alpha, p.beta, p.temperature, p.mu, p.eps, p.label_layer) == (0.01, 0.01, 0.1, 8.0, 0.05, 2)
    with pytest.raises(ConfigError, match="mixcl.temperature"):
        load_config(PROJECT_ROOT / "configs" / "mixcl-2d.yaml", ["mixcl.temperature=0"])
    with pytest.raises(ConfigError, match="mixcl.not_a_key"):
        load_config(PROJECT_ROOT / "configs" / "mixcl-2d.yaml", ["mixcl.not_a_key=1"])


def _synthetic_folder(root: Path, name: str, value: int, n: int = 4) -> Path:
    rng = np.random.default_rng(value)
    for sub in ("images", "masks"):
        (root / name / sub).mkdir(parents=True)
    for i in range(n):
        img = (rng.random((40, 36)) * 60 + value).astype(np.uint8)
        mask = np.zeros((40, 36), np.uint8)
        mask[5 + i:20 + i, 8:24] = 255
        Image.fromarray(img).save(root / name / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / name / "masks" / f"{i}.png")
    return root / name


def test_cli_pretrain_2d_synthetic_pool(tmp_path):
    a = _synthetic_folder(tmp_path, "a", 20)
    b = _synthetic_folder(tmp_path, "b", 150)
    config = tmp_path / "mixcl.yaml"
    preset = yaml.safe_load((PROJECT_ROOT / "configs" / "mixcl-2d.yaml").read_text())
    preset["mixcl"]["datasets"] = [{"adapter": "image_folder", "root": str(a), "name": "a", "classes": {1: "lesion"}},
                                   {"adapter": "image_folder", "root": str(b), "name": "b", "classes": {1: "organ"}}]
    config.write_text(yaml.safe_dump(preset))
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", str(config), f"out={out}", "mixcl.patch_size=32", "mixcl.vit_patch=8",
               "optim.batch_size=2", "optim.max_steps=2", *TINY])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r[k]) for r in records for k in ("loss", "loss_id", "loss_label", "loss_recon"))
    ckpt = load_checkpoint(out / "checkpoints" / "final.pt")
    assert ckpt["backbone"]["name"] == "unetr_encoder" and ckpt["method"] == "mixcl"
    assert ckpt["metadata"]["class_names"] == ["background", "a/lesion", "b/organ"]
    weights = backbone_state_dict(ckpt)
    backbone = build_pretrained_backbone(ckpt)  # the shared loader knows "unetr_encoder"
    torch.testing.assert_close(backbone.state_dict()["norm.weight"], weights["norm.weight"])
    seg = unetr_from_checkpoint(ckpt, out_channels=3)
    torch.testing.assert_close(seg.encoder.state_dict()["blocks.1.attn.qkv.weight"], weights["blocks.1.attn.qkv.weight"])


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("preset,extra", [
    ("mixcl-2d.yaml", ["mixcl.patch_size=64", "optim.batch_size=2"]),
    ("mixcl-3d.yaml", ["mixcl.patch_size=32", "mixcl.elastic_prob=0", "mixcl.cache=2", "optim.batch_size=2"]),
])
def test_cli_pretrain_real_pools_one_step(tmp_path, monkeypatch, preset, extra):
    shared = shared_subdir("us-seg" if "2d" in preset else "openkbp")
    monkeypatch.chdir(PROJECT_ROOT)  # preset roots are relative to the project root
    assert shared.is_dir()
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", f"configs/{preset}", f"out={out}", "optim.max_steps=1", *TINY, *extra])
    assert rc == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and np.isfinite(record["loss"])


def test_interrupted_run_resumes_to_the_same_losses(tmp_path, monkeypatch):
    """Shared trainer + MixCL views/sampling: a crash after the step-2 checkpoint, then --resume,
    reproduces the uninterrupted run's step-3 and step-4 losses."""
    from medcl.data.mixcl_views import MixCLViewMaker
    from medcl.train.api import pretrain

    a = _synthetic_folder(tmp_path, "a", 20)
    b = _synthetic_folder(tmp_path, "b", 150)
    preset = yaml.safe_load((PROJECT_ROOT / "configs" / "mixcl-2d.yaml").read_text())
    preset["mixcl"]["datasets"] = [{"adapter": "image_folder", "root": str(a), "name": "a"},
                                   {"adapter": "image_folder", "root": str(b), "name": "b"}]
    preset["mixcl"]["intensity_prob"] = 0.8
    args = ["mixcl.patch_size=32", "mixcl.vit_patch=8", "optim.batch_size=2", "optim.max_steps=4",
            "train.checkpoint_every=2", *TINY]
    full = pretrain(preset, args, out=tmp_path / "full")

    calls = {"n": 0}
    original = MixCLViewMaker.make_batch

    def crashing(self, indices, rng):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash while building batch 3")
        return original(self, indices, rng)

    monkeypatch.setattr(MixCLViewMaker, "make_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        pretrain(preset, args, out=tmp_path / "resumed")
    monkeypatch.setattr(MixCLViewMaker, "make_batch", original)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 2
    pretrain(preset, args, out=tmp_path / "resumed", resume=True)

    def losses(run):
        return [(r["step"], r["loss"], r["loss_label"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert losses(tmp_path / "resumed") == losses(full)
    assert [s for s, _, _ in losses(full)] == [1, 2, 3, 4]


def test_a_run_written_before_per_method_sections_resumes(tmp_path):
    """A MixCL run whose config.yaml and checkpoint carry USCL's default data / sampling / augment /
    model sections (as medcl wrote them before sections became per-method): ``--resume`` with that
    config.yaml continues it, warns about the dropped sections and rewrites config.yaml without them."""
    from medcl.train.api import pretrain

    preset = yaml.safe_load((PROJECT_ROOT / "configs" / "mixcl-2d.yaml").read_text())
    preset["mixcl"]["datasets"] = [{"adapter": "image_folder", "root": str(_synthetic_folder(tmp_path, "a", 20)), "name": "a"}]
    run = pretrain(preset, ["mixcl.patch_size=32", "mixcl.vit_patch=8", "optim.batch_size=2", "optim.max_steps=2", *TINY],
                   out=tmp_path / "run")
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert "sampling" not in ckpt["config"] and "sampling" not in yaml.safe_load((run / "config.yaml").read_text())
    save_checkpoint(run / "checkpoints" / "last.pt", {**ckpt, "config": {**ckpt["config"], **OLD_DEFAULT_SECTIONS}})
    old_config = {**yaml.safe_load((run / "config.yaml").read_text()), **OLD_DEFAULT_SECTIONS}
    (run / "config.yaml").write_text(yaml.safe_dump(old_config, sort_keys=False))

    with pytest.warns(ConfigWarning, match="data, sampling, augment, model: not used by method 'mixcl'"):
        rc = main(["pretrain", "--config", str(run / "config.yaml"), "optim.max_steps=3", "--resume"])
    assert rc == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert set(yaml.safe_load((run / "config.yaml").read_text())) == {"method", "out", "optim", "train", "mixcl"}
