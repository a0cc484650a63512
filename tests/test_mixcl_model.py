"""UNETR with a configurable ViT, encoder export/loading, and MixCL forward/backward in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from medcl.methods.mixcl import MixCL
from medcl.models.unetr import UNETREncoder, build_unetr, load_encoder_weights, monai_unetr_key
from medcl.weights import unetr_from_checkpoint

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2)


def test_patch16_depth12_equals_monai_unetr():
    from monai.networks.nets import UNETR as MonaiUNETR

    torch.manual_seed(0)
    ours = build_unetr(2, 32, 1, 3, num_layers=12, **TINY).eval()
    ref = MonaiUNETR(1, 3, 32, spatial_dims=2, **TINY).eval()
    mapped = {monai_unetr_key(k): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(mapped, strict=True)  # same modules, same shapes
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours.decoder.skip_layers == [3, 6, 9]


@pytest.mark.parametrize("dims,size,patch,depth", [(2, 32, 16, 3), (2, 32, 8, 2), (3, 16, 4, 2)])
def test_configurable_encoder_exposes_every_layer(dims, size, patch, depth):
    net = build_unetr(dims, size, 1, 2, patch_size=patch, num_layers=depth, feature_size=4, **TINY)
    x = torch.randn(1, 1, *([size] * dims))
    last, hidden = net.encoder(x)
    assert len(hidden) == depth
    assert net.encoder.to_grid(hidden[0]).shape == (1, 32, *([size // patch] * dims))
    out = net(x)
    assert out.shape == (1, 2, *([size] * dims))
    with pytest.raises(ValueError, match="input size"):
        net.encoder(torch.randn(1, 1, *([size * 2] * dims)))


def test_bad_patch_sizes():
    with pytest.raises(ValueError, match="divisible"):
        UNETREncoder(spatial_dims=2, img_size=30, patch_size=16, num_layers=1, **TINY)
    with pytest.raises(ValueError, match="2\\^k"):
        build_unetr(2, 36, 1, 1, patch_size=12, num_layers=1, **TINY)


def _method(dims, size, **kw):
    enc = UNETREncoder(spatial_dims=dims, img_size=size, in_channels=1, patch_size=8, num_layers=3, **TINY)
    return MixCL(enc, feature_size=4, pixel_budget=4, **kw)


def _batch(dims, size, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * dims
    p1, p2 = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    lab = torch.zeros((n,) + (size,) * dims, dtype=torch.long)
    lab[(slice(None),) + (slice(0, size // 2),) * dims] = 1
    lab2 = lab.clone()
    lab2[0, ...] = 2
    lab2[1, -4:] = -1
    annotated = torch.ones(n, 3, dtype=torch.bool)
    annotated[1, 2] = False
    return {"view1": p1 + 0.05 * torch.randn(shape, generator=g), "view1b": p1 + 0.05 * torch.randn(shape, generator=g),
            "view2": p2, "patch1": p1, "patch2": p2, "label1": lab, "label2": lab2,
            "annotated1": annotated, "annotated2": annotated, "source": torch.zeros(n, dtype=torch.long)}


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
def test_mixcl_forward_backward(dims, size):
    torch.manual_seed(0)
    method = _method(dims, size)
    out = method.training_step(_batch(dims, size))
    assert set(out) == {"loss", "loss_id", "loss_label", "loss_recon"}
    expected = out["loss_id"] + 0.01 * out["loss_label"] + 0.01 * out["loss_recon"]
    torch.testing.assert_close(out["loss"], expected)
    assert out["loss_label"] > 0
    out["loss"].backward()
    for name, p in method.named_parameters():
        if not p.requires_grad:  # MONAI's unused cross-attention norm, frozen on purpose
            assert "norm_cross_attn" in name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every layer's projector gets gradient from the identity term
    assert all(proj.net[0].weight.grad.abs().sum() > 0 for proj in method.projectors)


def test_ablation_switches():
    ident = _method(2, 32, use_label=False, use_recon=False)
    assert ident.decoder is None
    out = ident.training_step(_batch(2, 32))
    assert set(out) == {"loss", "loss_id"}
    torch.testing.assert_close(out["loss"], out["loss_id"])
    label_only = _method(2, 32, use_recon=False)
    assert set(label_only.training_step(_batch(2, 32))) == {"loss", "loss_id", "loss_label"}
    with pytest.raises(ValueError, match="label_layer"):
        _method(2, 32, label_layer=9)


def test_encoder_export_and_loading_into_a_segmentation_unetr():
    torch.manual_seed(0)
    method = _method(2, 32)
    info = {"name": "unetr_encoder", "kwargs": method.backbone_spec["kwargs"], "prefix": "backbone."}
    ckpt = {"backbone": info, "model": method.state_dict()}
    seg = unetr_from_checkpoint(ckpt, out_channels=4)
    for k, v in method.backbone.state_dict().items():
        torch.testing.assert_close(seg.encoder.state_dict()[k], v)
    # a larger fine-tuning input: the position embedding is interpolated, other weights kept
    bigger = unetr_from_checkpoint(ckpt, out_channels=4, img_size=48)
    assert bigger.encoder.patch_embedding.position_embeddings.shape[1] == 36
    torch.testing.assert_close(bigger.encoder.blocks[0].mlp.linear1.weight, method.backbone.blocks[0].mlp.linear1.weight)
    assert bigger(torch.zeros(1, 1, 48, 48)).shape == (1, 4, 48, 48)
    wrong = build_unetr(2, 32, 1, 4, patch_size=8, num_layers=2, **TINY)
    with pytest.raises(KeyError, match="missing"):
        load_encoder_weights(wrong, {k: v for k, v in method.backbone.state_dict().items() if "blocks.1." not in k})
    with pytest.raises(KeyError, match="unexpected"):
        load_encoder_weights(wrong, method.backbone.state_dict())
