"""A 2D U-Net whose encoder is medcl's ResNet-18 backbone (:func:`medcl.models.backbones.resnet18_backbone`).

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
DEFAULT_DECODER = (256, 128, 64, 64, 32)  # 1/16, 1/8, 1/4, 1/2, full resolution
STRIDE = 32  # the encoder's total downsampling


class ResNetUNet(nn.Module):
    """U-Net on a ResNet-18 encoder: ``[B, 1 or in_channels, H, W]`` in [0, 1] -> logits
    ``[B, out_channels, H, W]``."""

    def __init__(self, out_channels: int, in_channels: int = 1, input: Mapping[str, Any] | None = None,
                 decoder: Sequence[int] = DEFAULT_DECODER):
        super().__init__()
        if len(decoder) != 5:
            raise ValueError(f"decoder needs 5 widths (1/16, 1/8, 1/4, 1/2, full resolution), got {list(decoder)}")
        self.input_spec = InputSpec.from_dict(input, in_channels)
        if self.input_spec.in_channels != in_channels:
            raise ValueError(f"input convention has {self.input_spec.in_channels} channels, encoder {in_channels}")
        self.encoder = resnet18_backbone(in_channels=in_channels, spatial_dims=2)
        act = ("relu", {"inplace": True})
        norm_args = ("batch", {"affine": True})
        self.full = TwoConv(2, in_channels, decoder[4], act, norm_args, bias=True)  # full-resolution skip
        skips = (ENCODER_CHANNELS[3], ENCODER_CHANNELS[2], ENCODER_CHANNELS[1], ENCODER_CHANNELS[0], decoder[4])
        ups, width = [], ENCODER_CHANNELS[4]
        for skip, out in zip(skips, decoder):
            ups.append(UpCat(2, width, skip, out, act, norm_args, bias=True, upsample="deconv"))
            width = out
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(decoder[4], out_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at 1/2, 1/4, 1/8, 1/16, 1/32 of a model input (already normalised)."""
        e = self.encoder
        x = e.act(e.bn1(e.conv1(x)))
        feats = [x]
        x = x if getattr(e, "no_max_pool", False) else e.maxpool(x)
        for layer in (e.layer1, e.layer2, e.layer3, e.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad = (-width % STRIDE, -height % STRIDE)  # sizes that are not multiples of 32: pad, then crop
        x = self.input_spec.normalize(x)
        if any(pad):
            x = F.pad(x, (0, pad[0], 0, pad[1]), mode="replicate")
        feats = self.encode(x)
        skips = [feats[3], feats[2], feats[1], feats[0], self.full(x)]
        h = feats[4]
        for up, skip in zip(self.ups, skips):
            h = up(h, skip)
        return self.head(h)[..., :height, :width]


def build_unet(out_channels: int, in_channels: int = 1, input: Mapping[str, Any] | None = None,
               decoder: Sequence[int] = DEFAULT_DECODER, spatial_dims: int = 2, **unused: Any) -> ResNetUNet:
    """A :class:`ResNetUNet` (2D only; ``spatial_dims`` is accepted to refuse 3D clearly)."""
    if spatial_dims != 2:
        raise ValueError(f"the ResNet-18 U-Net is 2D; got spatial_dims={spatial_dims} (use the UNETR for 3D)")
    if unused:
        raise TypeError(f"unknown U-Net options {sorted(unused)}; known: decoder")
    return ResNetUNet(out_channels, in_channels, input, tuple(decoder))
