"""The joint encoder (method joint): USCL on videos + MixCL-CNN on a pixel-labeled pool, one
ResNet-18. Its loss against the two methods' own, one shared encoder in the state dict, the
exported backbone, exact resume, and two gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from resume_helpers import assert_same_final_state, killed_run, logged
from test_mixcl_cli import _synthetic_folder
from uscl_fixtures import tiny_overrides, write_frame_sets

from medcl.config import ConfigError, load_config
from medcl.methods.base import build_method
from medcl.models.backbones import resnet18_backbone
from medcl.train.api import pretrain
from medcl.weights import InitSpec, load_checkpoint, load_init

PROJECT = Path(__file__).resolve().parents[1]


def joint_config(tmp_path: Path) -> tuple[Path, list[str]]:
    """The preset with a synthetic pool of two labeled folders, and overrides for a tiny video run."""
    pool = [{"adapter": "image_folder", "root": str(_synthetic_folder(tmp_path, name, value)), "name": name,
             "classes": {1: organ}} for name, value, organ in (("a", 20, "lesion"), ("b", 150, "organ"))]
    preset = yaml.safe_load((PROJECT / "configs" / "joint-2d.yaml").read_text())
    preset["joint"]["pixel"]["datasets"] = pool
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(preset))
    frames = write_frame_sets(tmp_path / "frames")
    return path, tiny_overrides(frames, tmp_path / "unused", **{
        "joint.pixel.patch_size": 32, "joint.pixel.pixel_budget": 4, "joint.pixel_batch_size": 2,
        "optim.max_steps": 4, "train.checkpoint_every": 2, "train.log_every": 1})


def test_joint_loss_is_the_weighted_sum_and_the_encoder_is_shared(tmp_path):
    path, overrides = joint_config(tmp_path)
    cfg = load_config(path, overrides + ["joint.weight_video=0.7", "joint.weight_pixel=2.5"])
    torch.manual_seed(0)
    method, loader = build_method(cfg)
    video, pixel = method._parts
    assert pixel.backbone is method.backbone and video.backbone is method.backbone
    # every tensor once: the encoder under backbone., each head under its own prefix
    keys = list(method.state_dict())
    plain = set(resnet18_backbone().state_dict())
    assert {k[len("backbone."):] for k in keys if k.startswith("backbone.")} == plain
    assert not [k for k in keys if ".backbone." in k]
    batch = next(loader.epoch_batches(0))
    assert set(batch) == {"video", "pixel"}
    method.train()
    torch.manual_seed(1)
    out = method.training_step(batch)
    torch.manual_seed(1)
    expected = 0.7 * video.training_step(batch["video"])["loss"] + 2.5 * pixel.training_step(batch["pixel"])["loss"]
    torch.testing.assert_close(out["loss"], expected)
    assert {"video_loss_con", "video_loss_sup", "pixel_loss_id", "pixel_loss_label", "pixel_loss_recon"} <= set(out)
    # the encoder is pushed by both terms: its gradient is the sum of the two weighted gradients
    params = [p for p in method.backbone.parameters()]

    def encoder_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=False)])

    torch.manual_seed(1)
    both = encoder_grad(method.training_step(batch)["loss"])
    torch.manual_seed(1)
    g_video = encoder_grad(0.7 * video.training_step(batch["video"])["loss"])
    g_pixel = encoder_grad(2.5 * pixel.training_step(batch["pixel"])["loss"])
    torch.testing.assert_close(both, g_video + g_pixel, rtol=1e-4, atol=1e-6)
    assert g_video.abs().sum() > 0 and g_pixel.abs().sum() > 0
    # log_grad_norms: the norm of each weighted stream's gradient on the shared encoder, loss unchanged
    assert "grad_video" not in out
    method.log_grad_norms = True
    torch.manual_seed(1)
    logged = method.training_step(batch)
    torch.testing.assert_close(logged["loss"], out["loss"])
    # reference norms in float64 (a float32 norm of the 11M concatenated entries is off by ~5e-4 here)
    torch.testing.assert_close(logged["grad_video"].double(), g_video.double().norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["grad_pixel"].double(), g_pixel.double().norm(), rtol=1e-5, atol=1e-6)
    assert build_method(load_config(path, overrides + ["joint.log_grad_norms=true"]))[0].log_grad_norms


def test_joint_run_exports_a_resnet18_for_classification_and_the_unet(tmp_path):
    from medcl.evaluate.segment import load_encoder_checkpoint

    path, overrides = joint_config(tmp_path)
    run = pretrain(path, overrides, out=tmp_path / "run")
    records = logged(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["video_loss"], r["pixel_loss"]])).all() for r in records)
    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    assert ckpt["method"] == "joint" and ckpt["backbone"]["name"] == "resnet18"
    assert ckpt["metadata"]["pixel"]["class_names"] == ["background", "a/lesion", "b/organ"]
    loaded = load_init(InitSpec("joint", str(run)), expect="resnet18")
    weights = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    torch.testing.assert_close(loaded.network.state_dict()["layer4.1.conv2.weight"], weights["layer4.1.conv2.weight"])
    state, _ = load_encoder_checkpoint(run / "checkpoints" / "final.pt", "unet", 2)
    assert state  # the U-Net's encoder takes it


def test_joint_resumes_exactly(tmp_path):
    path, overrides = joint_config(tmp_path)
    full = pretrain(path, overrides, out=tmp_path / "full")
    killed_run(path, overrides, tmp_path / "cut", step=4)  # dies in step 4, after the step-2 checkpoint
    resumed = pretrain(path, overrides, out=tmp_path / "cut", resume=True)
    assert [r["loss"] for r in logged(resumed)] == pytest.approx([r["loss"] for r in logged(full)], rel=1e-5)
    assert_same_final_state(full, resumed)


def test_joint_config_errors(tmp_path):
    path, overrides = joint_config(tmp_path)
    with pytest.raises(ConfigError, match="spatial_dims"):
        load_config(path, overrides + ["joint.pixel.spatial_dims=3"])
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(path, overrides + ["joint.pixel.patch_size=48"])
    with pytest.raises(ConfigError, match="weight_pixel"):
        load_config(path, overrides + ["joint.weight_pixel=-1"])


# ------------------------------------------------------------------ two gloo processes
def _ddp_worker(rank: int, init_file: str, path: str, overrides: list[str]) -> None:
    import os

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
        pretrain(path, overrides)
    finally:
        dist.destroy_process_group()


def test_joint_under_two_gloo_processes(tmp_path):
    path, overrides = joint_config(tmp_path)
    overrides = overrides + [f"out={tmp_path / 'ddp'}", "optim.max_steps=2", "joint.pixel_batch_size=4"]
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(path), overrides), nprocs=2, join=True)
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "final.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2
    first, second = ckpt["loader_per_rank"]
    # each rank draws its own share of the videos and of the pool
    assert first["video"] != second["video"] and first["pixel"] != second["pixel"]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(abs(r["loss"]) < float("inf") for r in records)
