"""A 2D or 3D U-Net whose encoder is medcl's ResNet-18 backbone (:func:`medcl.models.backbones.resnet18_backbone`).

The encoder is the registry's ``resnet18`` (MONAI ResNet, stride-2 stem), so any ResNet-18 init
medcl reads (:func:`medcl.weights.load_init`: a USCL / SimCLR / supervised checkpoint, an
export, a torchvision / timm state dict) loads into ``net.encoder`` with ``strict=True``. Skip
features are taken by calling the backbone's own submodules::

    stem (conv1, bn1, act)  1/2   64 channels
    maxpool + layer1        1/4   64
    layer2                  1/8   128
    layer3                  1/16  256
    layer4                  1/32  512

The decoder is light and made of MONAI blocks (``basic_unet.UpCat``: transposed-convolution
upsampling, concatenation, two conv-norm-act layers), ending with a full-resolution skip from the
input, so the logits come out at the input's resolution (any size: inputs are padded to a multiple
of 32 and the logits cropped). The backbone's input convention (:class:`medcl.inputs.InputSpec`, ``input``) is part
of the network: it takes images in [0, 1] ``[B, 1, H, W]`` and applies ``spec.normalize`` first.

``spatial_dims=3`` builds the same network from the 3D members of the family (MONAI's 3D ResNet-18
with the same stride-2 stem, ``[B, 1, H, W, D]`` volumes; 3D decoder blocks, a lighter default
decoder :data:`DEFAULT_DECODER_3D` since full-resolution 3D feature maps dominate the memory).
A 3D ResNet-18 checkpoint (``spatial_dims: 3``) loads into its encoder the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import TwoConv, UpCat
from torch import nn

from medcl.inputs import InputSpec
from medcl.models.backbones import resnet18_backbone

ENCODER_CHANNELS = (64, 64, 128, 256, 512)  # stem, layer1 .. layer4
DEFAULT_DECODER = (256, 128, 64, 32, 16)  # 1/16, 1/8, 1/4, 1/2, full resolution (MONAI FlexibleUNet's widths)
DEFAULT_DECODER_3D = (128, 64, 32, 16, 8)
# the 2D default of model files saved before the decoder was recorded in them (1.7x slower to
# train at 128 px than DEFAULT_DECODER: full-resolution stages dominate the compute)
LEGACY_DECODER = (256, 128, 64, 64, 32)
STRIDE = 32  # the encoder's total downsampling


def resnet_stages(e: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The stage maps of a MONAI ResNet ``e`` (stem, layer1 .. layer4) for an input already
    normalised and padded to a multiple of :data:`STRIDE` (the U-Net's skips, MixCL-CNN's levels)."""
    x = e.act(e.bn1(e.conv1(x)))
    feats = [x]
    x = x if getattr(e, "no_max_pool", False) else e.maxpool(x)
    for layer in (e.layer1, e.layer2, e.layer3, e.layer4):
        x = layer(x)
        feats.append(x)
    return feats


class ResNetUNet(nn.Module):
    """U-Net on a ResNet-18 encoder: ``[B, 1 or in_channels, *spatial]`` in [0, 1] -> logits
    ``[B, out_channels, *spatial]`` (``spatial``: H, W or H, W, D)."""

    def __init__(self, out_channels: int, in_channels: int = 1, input: Mapping[str, Any] | None = None,
                 decoder: Sequence[int] | None = None, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"the ResNet-18 U-Net is 2D or 3D; got spatial_dims={spatial_dims}")
        decoder = tuple(decoder) if decoder is not None else (DEFAULT_DECODER if spatial_dims == 2 else DEFAULT_DECODER_3D)
        self.spatial_dims = spatial_dims
        # medcl.precision: measured on a bf16-native CPU, bf16 autocast does not speed the 3D U-Net
        # up (3D convolution backward dominates and is no faster in bf16) and on tiny crops gave an
        # occasional NaN loss, so precision 'auto' keeps it in fp32
        self.prefers_fp32 = spatial_dims == 3
        if len(decoder) != 5:
            raise ValueError(f"decoder needs 5 widths (1/16, 1/8, 1/4, 1/2, full resolution), got {list(decoder)}")
        self.input_spec = InputSpec.from_dict(input, in_channels)
        if self.input_spec.in_channels != in_channels:
            raise ValueError(f"input convention has {self.input_spec.in_channels} channels, encoder {in_channels}")
        self.encoder = resnet18_backbone(in_channels=in_channels, spatial_dims=spatial_dims)
        act = ("relu", {"inplace": True})
        norm_args = ("batch", {"affine": True})
        self.full = TwoConv(spatial_dims, in_channels, decoder[4], act, norm_args, bias=True)  # full-resolution skip
        skips = (ENCODER_CHANNELS[3], ENCODER_CHANNELS[2], ENCODER_CHANNELS[1], ENCODER_CHANNELS[0], decoder[4])
        ups, width = [], ENCODER_CHANNELS[4]
        for skip, out in zip(skips, decoder):
            ups.append(UpCat(spatial_dims, width, skip, out, act, norm_args, bias=True, upsample="deconv"))
            width = out
        self.ups = nn.ModuleList(ups)
        self.head = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(decoder[4], out_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at 1/2, 1/4, 1/8, 1/16, 1/32 of a model input (already normalised)."""
        return resnet_stages(self.encoder, x)

    def decode(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Logits from a model input (normalised, padded to a multiple of 32) and its :meth:`encode`
        features (MixCL on CNN encoders reuses this decoder for reconstruction)."""
        skips = [feats[3], feats[2], feats[1], feats[0], self.full(x)]
        h = feats[4]
        for up, skip in zip(self.ups, skips):
            h = up(h, skip)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        pad = [p for n in reversed(spatial) for p in (0, -n % STRIDE)]  # not multiples of 32: pad, then crop
        x = self.input_spec.normalize(x)
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        return self.decode(x, self.encode(x))[(...,) + tuple(slice(0, n) for n in spatial)]


def build_unet(out_channels: int, in_channels: int = 1, input: Mapping[str, Any] | None = None,
               decoder: Sequence[int] | None = None, spatial_dims: int = 2, **unused: Any) -> ResNetUNet:
    """A :class:`ResNetUNet`, 2D or 3D (``spatial_dims``)."""
    if unused:
        raise TypeError(f"unknown U-Net options {sorted(unused)}; known: decoder")
    return ResNetUNet(out_channels, in_channels, input, decoder, spatial_dims)
