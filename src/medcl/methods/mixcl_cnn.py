"""MixCL on a CNN encoder: the three terms of :mod:`medcl.methods.mixcl` on the stages of medcl's
ResNet-18 (2D or 3D), for the CNN U-Net that segmentation on small data uses.

    L = L_id + alpha * L_label + beta * L_recon            (the same pool, views and losses as MixCL)

- theta: the ResNet-18 (``backbone``; exported as a plain ``resnet18``, so it initialises
  ``--arch unet``, classification fine-tuning and a torchvision-layout export like any USCL /
  SimCLR backbone).
- sigma^l: a projector (1x1 convs [c, c, 2c]) on each of the five stage maps: stem (1/2, 64
  channels), layer1 (1/4, 64), layer2 (1/8, 128), layer3 (1/16, 256), layer4 (1/32, 512).
- L_id: pixel Barlow Twins between V1 and V1' at every position of every stage.
- L_label: supervised pixel contrast on stage ``label_stage`` (1 = stem ... 5 = layer4; default 2,
  layer1 at 1/4 resolution: fine enough for boundary-weighted sampling of small structures),
  background-background pairs and unannotated classes excluded, as in MixCL.
- L_recon: the U-Net decoder of :class:`medcl.models.unet.ResNetUNet` (phi, discarded after
  pretraining) restores the clean patch from the encoder's stage maps (MSE).

Patches must be multiples of 32 pixels per side (the encoder's stride). Everything else (views,
pixel sampling, the loss terms, ``combine``) is MixCL's, through its public sub-steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from medcl.methods.base import Method
from medcl.methods.mixcl import Encoded, MixCL, MixCLConfig
from medcl.models.unet import ENCODER_CHANNELS, STRIDE, ResNetUNet, resnet_stages
from medcl.models.unetr import Projector


class _Decoder(nn.Module):
    """The decoder half of a :class:`ResNetUNet` (its encoder is the method's ``backbone``)."""

    def __init__(self, unet: ResNetUNet) -> None:
        super().__init__()
        self.full, self.ups, self.head = unet.full, unet.ups, unet.head

    def forward(self, x: Tensor, feats: list[Tensor]) -> Tensor:
        return ResNetUNet.decode(self, x, feats)  # type: ignore[arg-type]


class MixCLCNN(MixCL):
    """See the module docstring: MixCL's ``training_step`` with a CNN :meth:`encode` / :meth:`reconstruct`."""

    name: ClassVar[str] = "mixcl_cnn"

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, projector_norm: str = "batch",
                 lambda_offdiag: float = 5e-3, temperature: float = 0.1, alpha: float = 0.01, beta: float = 0.01,
                 use_label: bool = True, use_recon: bool = True, label_stage: int = 2, pixel_budget: int = 32,
                 mu: float = 8.0, eps: float = 0.05, label_pooling: str = "majority",
                 label_min_fraction: float = 0.25, cross_view_only: bool = False,
                 decoder: list[int] | None = None, log_grad_norms: bool = False) -> None:
        Method.__init__(self)
        if not 1 <= label_stage <= len(ENCODER_CHANNELS):
            raise ValueError(f"label_stage must be in [1, {len(ENCODER_CHANNELS)}], got {label_stage}")
        unet = ResNetUNet(out_channels=in_channels, in_channels=in_channels, decoder=decoder, spatial_dims=spatial_dims)
        self.backbone = unet.encoder  # theta
        self.backbone_spec = {"name": "resnet18", "kwargs": {"in_channels": in_channels, "spatial_dims": spatial_dims}}
        self.projectors = nn.ModuleList(Projector(spatial_dims, c, projector_norm) for c in ENCODER_CHANNELS)
        self.decoder = _Decoder(unet) if use_recon else None
        self._set_terms(lambda_offdiag, temperature, alpha, beta, use_label, use_recon, label_stage - 1, pixel_budget,
                        mu, eps, label_pooling, label_min_fraction, cross_view_only, log_grad_norms)

    def encode(self, batch: dict[str, Any]) -> Encoded:
        views = [batch["view1"], batch["view1b"]] + ([batch["view2"]] if self.use_label or self.use_recon else [])
        x = torch.cat(views)
        if any(n % STRIDE for n in x.shape[2:]):
            raise ValueError(f"MixCL on a ResNet needs patches that are multiples of {STRIDE} pixels, got {list(x.shape[2:])}")
        feats = resnet_stages(self.backbone, x)  # the U-Net's own split of the ResNet into stages
        return Encoded(x, feats[-1], feats, [proj(f) for proj, f in zip(self.projectors, feats)])

    def reconstruct(self, encoded: Encoded) -> Tensor:
        return self.decoder(encoded.x, encoded.hidden)


class MixCLCNNConfig(MixCLConfig):
    """The ``mixcl_cnn:`` section: MixCL's data, views and losses; the encoder is the ResNet-18
    (the ViT options of ``mixcl:`` do not apply; preset configs/mixcl-cnn-2d.yaml)."""

    label_stage: int = Field(2, ge=1, le=5)
    decoder: list[int] | None = None  # U-Net decoder widths for reconstruction; None = the U-Net's default

    @model_validator(mode="after")
    def _multiple_of_stride(self) -> MixCLCNNConfig:
        if self.patch_size % STRIDE:
            raise ValueError(f"patch_size={self.patch_size} must be a multiple of {STRIDE} (the ResNet's stride)")
        return self


def build(config, *, rank: int = 0, world_size: int = 1):
    """``(method, loader)``: MixCL's pool and views (:func:`medcl.methods.mixcl.build`), this encoder."""
    from medcl.methods import mixcl

    loader, metadata = mixcl.pool_loader(config, rank=rank, world_size=world_size)
    method = from_section(config.params)
    method.metadata = metadata
    return method, loader


def from_section(p: MixCLCNNConfig, in_channels: int = 1) -> MixCLCNN:
    """The method a ``mixcl_cnn:`` section describes (also ``joint.pixel``)."""
    return MixCLCNN(spatial_dims=p.spatial_dims, in_channels=in_channels, projector_norm=p.projector_norm,
                    lambda_offdiag=p.lambda_offdiag, temperature=p.temperature, alpha=p.alpha, beta=p.beta,
                    use_label=p.use_label, use_recon=p.use_recon, label_stage=p.label_stage,
                    pixel_budget=p.pixel_budget, mu=p.mu, eps=p.eps, label_pooling=p.label_pooling,
                    label_min_fraction=p.label_min_fraction, cross_view_only=p.label_pairs == "cross",
                    decoder=p.decoder, log_grad_norms=p.log_grad_norms)
