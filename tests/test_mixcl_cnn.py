"""MixCL on the ResNet-18 (method mixcl_cnn): the terms on CNN stages in 2D and 3D, the exported
backbone initialising the U-Net, the CLI run, bad patch sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from test_mixcl_cli import _synthetic_folder
from test_mixcl_model import _batch

from medcl.cli import main
from medcl.config import ConfigError, load_config
from medcl.losses.pixel_barlow import PixelBarlowTwinsLoss
from medcl.methods.mixcl_cnn import MixCLCNN
from medcl.models.backbones import resnet18_backbone
from medcl.models.unet import ENCODER_CHANNELS, build_unet
from medcl.weights import InitSpec, load_checkpoint, load_init
from conftest import PROJECT_ROOT


@pytest.mark.parametrize("dims,size", [(2, 64), (3, 32)])
def test_terms_on_every_stage_and_gradients(dims, size):
    torch.manual_seed(0)
    method = MixCLCNN(spatial_dims=dims, pixel_budget=4)
    batch = _batch(dims, size)
    encoded = method.encode(batch)
    n = batch["view1"].shape[0]
    # five stages at 1/2 ... 1/32 of the patch, each projected to 2c channels
    assert [tuple(z.shape[1:]) for z in encoded.z] == [
        (2 * c, *([size // 2 ** (k + 1)] * dims)) for k, c in enumerate(ENCODER_CHANNELS)]
    # the identity term is the naive sum of pixel Barlow Twins over the stages
    reference = PixelBarlowTwinsLoss(5e-3)([z[:n] for z in encoded.z], [z[n:2 * n] for z in encoded.z])
    out = method.training_step(batch)
    torch.testing.assert_close(out["loss_id"], reference.detach())
    torch.testing.assert_close(out["loss"], out["loss_id"] + 0.01 * out["loss_label"] + 0.01 * out["loss_recon"])
    assert out["loss_label"] > 0
    assert method.reconstruct(encoded).shape == (3 * n, 1, *([size] * dims))  # V1, V1', V2 restored
    out["loss"].backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the label term alone acts on the label stage's projector (stage 2) and on no other
    method.zero_grad()
    encoded = method.encode(batch)
    terms = method.loss_terms(batch, encoded, method.sample(batch, tuple(encoded.z[1].shape[2:])),
                              method.reconstruct(encoded))
    terms["loss_label"].backward()
    grads = [proj.net[0].weight.grad for proj in method.projectors]
    assert grads[1] is not None and grads[1].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for k, g in enumerate(grads) if k != 1)


def test_label_stage_and_patch_size_are_checked():
    with pytest.raises(ValueError, match="label_stage"):
        MixCLCNN(label_stage=6)
    method = MixCLCNN(pixel_budget=4)
    with pytest.raises(ValueError, match="multiples of 32"):
        method.encode(_batch(2, 48))
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(PROJECT_ROOT / "configs" / "mixcl-cnn-2d.yaml", ["mixcl_cnn.patch_size=48"])


def test_cli_run_exports_a_resnet18_that_initialises_the_unet(tmp_path):
    a = _synthetic_folder(tmp_path, "a", 20)
    b = _synthetic_folder(tmp_path, "b", 150)
    preset = yaml.safe_load((PROJECT_ROOT / "configs" / "mixcl-cnn-2d.yaml").read_text())
    preset["mixcl_cnn"]["datasets"] = [
        {"adapter": "image_folder", "root": str(a), "name": "a", "classes": {1: "lesion"}},
        {"adapter": "image_folder", "root": str(b), "name": "b", "classes": {1: "organ"}}]
    config = tmp_path / "mixcl_cnn.yaml"
    config.write_text(yaml.safe_dump(preset))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), f"out={out}", "mixcl_cnn.patch_size=32", "optim.batch_size=2",
                 "optim.max_steps=2", "mixcl_cnn.pixel_budget=4", "train.progress=false",
                 "train.tensorboard=false"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r[k]) for r in records for k in ("loss", "loss_id", "loss_label", "loss_recon"))
    ckpt = load_checkpoint(out / "checkpoints" / "final.pt")
    assert ckpt["method"] == "mixcl_cnn" and ckpt["backbone"]["name"] == "resnet18"
    assert not any(k.startswith("decoder.encoder") for k in ckpt["model"])  # the encoder is stored once
    loaded = load_init(InitSpec("mixcl_cnn", str(out)), expect="resnet18")
    reference = resnet18_backbone()
    reference.load_state_dict(loaded.state, strict=True)  # a plain ResNet-18: USCL's fine-tuning takes it
    unet = build_unet(out_channels=2)
    unet.encoder.load_state_dict(loaded.state, strict=True)
    torch.testing.assert_close(unet.encoder.conv1.weight, ckpt["model"]["backbone.conv1.weight"])


def test_term_gradient_norms_match_separate_backward_passes():
    torch.manual_seed(0)
    method = MixCLCNN(pixel_budget=4, log_grad_norms=True, alpha=0.5, beta=2.0)
    batch = _batch(2, 64)
    torch.manual_seed(1)
    out = method.training_step(batch)
    assert {"grad_id", "grad_label", "grad_recon"} <= set(out)
    for key, weight in (("id", 1.0), ("label", 0.5), ("recon", 2.0)):
        method.zero_grad()
        torch.manual_seed(1)
        encoded = method.encode(batch)
        samples = method.sample(batch, tuple(encoded.z[1].shape[2:]))
        terms = method.loss_terms(batch, encoded, samples, method.reconstruct(encoded))
        (weight * terms[f"loss_{key}"]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in method.backbone.parameters() if p.grad is not None))
        torch.testing.assert_close(out[f"grad_{key}"], norm, rtol=1e-4, atol=1e-6)

