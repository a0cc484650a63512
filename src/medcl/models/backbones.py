"""Backbones: MONAI networks configured as the papers use them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets import ResNet
from torch import nn

RESNET18_FEATURES = 512


def resnet18_backbone(in_channels: int = 1, spatial_dims: int = 2) -> ResNet:
    """ResNet-18 feature extractor (He et al. 2016) returning pooled 512-d features.

    ``conv1_t_stride=2`` gives the standard ImageNet architecture: MONAI's default stride-1 first
    convolution (a 3D MedicalNet heritage) costs four times the compute at the same input size.
    The last residual stage is ``layer4`` (what USCL's evaluation protocol fine-tunes).
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return ResNet(
        block="basic",
        layers=[2, 2, 2, 2],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        feed_forward=False,
    )


def unetr_encoder_backbone(**kwargs) -> nn.Module:
    """The ViT encoder of UNETR exported by MixCL (see medcl.models.unetr.UNETREncoder)."""
    from medcl.models.unetr import UNETREncoder

    return UNETREncoder(**kwargs)


# The one registry of architectures: name -> builder(**kwargs). Checkpoints and exported files
# name their architecture; medcl.weights rebuilds it from here.
BACKBONES: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18_backbone, "unetr_encoder": unetr_encoder_backbone}


def register_backbone(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``build_backbone(name, **kwargs)`` (and so every weights reader) know ``builder``."""
    BACKBONES[name] = builder


def build_backbone(name: str = "resnet18", **kwargs) -> nn.Module:
    """Build a backbone by name; an unknown name raises KeyError listing the known ones."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone architecture {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


def feature_dim(backbone: nn.Module, in_channels: int = 1, size: int = 64) -> int:
    """Output feature width, measured with a dry forward pass."""
    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        out = backbone(torch.zeros(1, in_channels, size, size))
        backbone.train(was_training)
    return int(out.shape[-1])
