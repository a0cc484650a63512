"""UNETR with a configurable ViT encoder that exposes every layer (Hatamizadeh et al., WACV 2022).

MONAI's :class:`monai.networks.nets.UNETR` fixes the ViT at 12 layers, patch 16, and reads hidden
states 3/6/9. MixCL needs every layer's hidden state and this CPU needs small ViTs, so the network
is composed here from MONAI's own pieces:

- :class:`UNETREncoder`: MONAI's :class:`~monai.networks.nets.ViT` (depth, width, heads, patch
  configurable); returns the normalised last layer and all hidden states, and reshapes tokens to
  grids. This is the part exported after pretraining (checkpoint backbone name ``unetr_encoder``).
- :class:`UNETRDecoder`: the UNETR convolutional decoder built from MONAI's ``UnetrBasicBlock``,
  ``UnetrPrUpBlock``, ``UnetrUpBlock`` and ``UnetOutBlock``, generalised to a patch size
  2^k (k >= 2): k resolution levels, skip connections from hidden states ``i * depth // k``
  (i = 1..k-1). With patch 16 and depth 12 this is exactly MONAI's UNETR (layers 3/6/9, same
  blocks, same parameter shapes; :func:`monai_unetr_key` maps the parameter names).
- :class:`UNETR`: encoder + decoder; :func:`build_unetr` builds it and
  :func:`load_encoder_weights` initialises its encoder from pretrained weights (read by
  :mod:`medcl.weights`).

>>> net = build_unetr(spatial_dims=2, img_size=64, in_channels=1, out_channels=3,
...                   hidden_size=64, mlp_dim=128, num_layers=4, num_heads=4)
>>> net(torch.zeros(1, 1, 64, 64)).shape
torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import ViT
from monai.utils import ensure_tuple_rep
from torch import nn


class UNETREncoder(ViT):
    """MONAI ViT for dense tasks: ``forward(x) -> (last_normed_tokens, [hidden_state_l ...])``.

    Args mirror :func:`encoder_kwargs` (all plain types, stored in checkpoints). ``img_size`` must
    be divisible by ``patch_size``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        img_size: int | Sequence[int] = 96,
        in_channels: int = 1,
        patch_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        size = ensure_tuple_rep(img_size, spatial_dims)
        if any(s % patch_size for s in size):
            raise ValueError(f"img_size {tuple(size)} must be divisible by patch_size {patch_size}")
        super().__init__(
            in_channels=in_channels,
            img_size=size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
        )
        self.kwargs: dict[str, Any] = dict(
            spatial_dims=spatial_dims, img_size=list(size), in_channels=in_channels, patch_size=patch_size,
            hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
            dropout_rate=dropout_rate, qkv_bias=qkv_bias,
        )
        self.spatial_dims = spatial_dims
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.patch_size = patch_size
        self.img_size = tuple(size)
        self.grid_size = tuple(s // patch_size for s in size)
        # MONAI's TransformerBlock always creates norm_cross_attn, unused without cross-attention:
        # frozen so that DistributedDataParallel does not wait for its gradients (the keys stay,
        # so state dicts still match MONAI's ViT/UNETR)
        for block in self.blocks:
            if not getattr(block, "with_cross_attention", False) and hasattr(block, "norm_cross_attn"):
                block.norm_cross_attn.requires_grad_(False)

    def forward(self, x: torch.Tensor):  # noqa: D102 (ViT.forward, with a clear shape error)
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"encoder built for input size {self.img_size}, got {tuple(x.shape[2:])}")
        return super().forward(x)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> feature map ``[B, C, *grid]``."""
        b = tokens.shape[0]
        return tokens.transpose(1, 2).reshape(b, self.hidden_size, *self.grid_size)


def encoder_kwargs(encoder: UNETREncoder) -> dict[str, Any]:
    """Plain-type constructor arguments (for checkpoint ``backbone.kwargs``)."""
    return dict(encoder.kwargs)


class UNETRDecoder(nn.Module):
    """UNETR's convolutional decoder for a ViT with patch size 2^k (see the module docstring).

    ``forward(x_in, last, hidden_states)``: the network input (first skip connection), the
    normalised last layer and the list of hidden states, all tokens ``[B, N, C]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        hidden_size: int,
        num_layers: int,
        grid_size: Sequence[int],
        patch_size: int = 16,
        feature_size: int = 16,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        conv_block: bool = True,
    ) -> None:
        super().__init__()
        levels = int(round(math.log2(patch_size)))
        if 2**levels != patch_size or levels < 2:
            raise ValueError(f"UNETR decoder needs patch_size = 2^k with k >= 2, got {patch_size}")
        self.levels = levels
        self.hidden_size = hidden_size
        self.grid_size = tuple(grid_size)
        # skip i (i = 1..k-1) reads hidden state i * depth // k: 3/6/9 for depth 12, patch 16 (MONAI)
        self.skip_layers = [i * num_layers // levels for i in range(1, levels)]
        common = dict(spatial_dims=spatial_dims, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=feature_size, stride=1, **common)
        # encoder{i+1}: hidden tokens upsampled k-i times to 1/2^i of the input
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=hidden_size, out_channels=feature_size * 2**i, num_layer=levels - 1 - i, stride=1,
                upsample_kernel_size=2, conv_block=conv_block, **common,
            )
            for i in range(1, levels)
        )
        # decoders from the bottleneck up: hidden -> f*2^(k-1) -> ... -> f
        channels = [hidden_size] + [feature_size * 2 ** (levels - 1 - i) for i in range(levels)]
        self.ups = nn.ModuleList(
            UnetrUpBlock(in_channels=channels[i], out_channels=channels[i + 1], upsample_kernel_size=2, **common)
            for i in range(levels)
        )
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=feature_size, out_channels=out_channels)

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_size, *self.grid_size)

    def forward(self, x_in: torch.Tensor, last: torch.Tensor, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = [self.encoder1(x_in)]
        skips += [block(self._grid(hidden_states[layer])) for block, layer in zip(self.skips, self.skip_layers)]
        x = self._grid(last)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.out(x)


class UNETR(nn.Module):
    """UNETR = :class:`UNETREncoder` (``.encoder``) + :class:`UNETRDecoder` (``.decoder``)."""

    def __init__(self, encoder: UNETREncoder, decoder: UNETRDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last, hidden = self.encoder(x)
        return self.decoder(x, last, hidden)


def build_encoder(**kwargs: Any) -> UNETREncoder:
    """The ``unetr_encoder`` backbone from its checkpoint kwargs."""
    return UNETREncoder(**kwargs)


def build_decoder(encoder: UNETREncoder, out_channels: int, feature_size: int = 16, norm_name: str | tuple = "instance") -> UNETRDecoder:
    return UNETRDecoder(
        spatial_dims=encoder.spatial_dims, in_channels=encoder.kwargs["in_channels"], out_channels=out_channels,
        hidden_size=encoder.hidden_size, num_layers=encoder.num_layers, grid_size=encoder.grid_size,
        patch_size=encoder.patch_size, feature_size=feature_size, norm_name=norm_name,
    )


def build_unetr(
    spatial_dims: int,
    img_size: int | Sequence[int],
    in_channels: int,
    out_channels: int,
    patch_size: int = 16,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_layers: int = 12,
    num_heads: int = 12,
    feature_size: int = 16,
    norm_name: str | tuple = "instance",
    dropout_rate: float = 0.0,
) -> UNETR:
    """A UNETR for segmentation (``out_channels`` classes) or reconstruction (``= in_channels``).

    Defaults are the paper's (ViT-B/16, feature size 16, instance norm). To fine-tune from MixCL,
    pass the pretraining checkpoint's ``backbone.kwargs`` (and ``img_size``), then call
    :func:`load_encoder_weights`.
    """
    encoder = UNETREncoder(
        spatial_dims=spatial_dims, img_size=img_size, in_channels=in_channels, patch_size=patch_size,
        hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
        dropout_rate=dropout_rate,
    )
    return UNETR(encoder, build_decoder(encoder, out_channels, feature_size, norm_name))


def load_encoder_weights(net: UNETR | UNETREncoder, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load pretrained encoder weights (keys without prefix) into ``net``'s encoder.

    Every encoder parameter must be present with the same shape, except the position embedding,
    which is interpolated when the fine-tuning input size differs from the pretraining one.
    Errors name the offending keys and shapes.
    """
    encoder = net.encoder if isinstance(net, UNETR) else net
    own = encoder.state_dict()
    state = dict(state_dict)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"encoder weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    pos_key = "patch_embedding.position_embeddings"
    if pos_key in state and state[pos_key].shape != own[pos_key].shape:
        state[pos_key] = _resize_position_embedding(state[pos_key], encoder.grid_size)
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"encoder weight shapes differ (checkpoint vs model): {bad[:5]}")
    encoder.load_state_dict(state)


def _resize_position_embedding(pos: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    n, c = pos.shape[1], pos.shape[2]
    side = round(n ** (1 / len(grid)))
    if side ** len(grid) != n:
        raise ValueError(f"cannot resize a non-cubic position embedding of {n} tokens to grid {tuple(grid)}")
    old = pos.reshape(1, *([side] * len(grid)), c).movedim(-1, 1)
    mode = "bilinear" if len(grid) == 2 else "trilinear"
    new = torch.nn.functional.interpolate(old, size=tuple(grid), mode=mode, align_corners=False)
    return new.movedim(1, -1).reshape(1, -1, c)


def monai_unetr_key(key: str, levels: int = 4) -> str:
    """Map a parameter name of :class:`UNETR` to MONAI's ``UNETR`` naming (patch 16: levels 4)."""
    if key.startswith("encoder."):
        return "vit." + key[len("encoder."):]
    key = key[len("decoder."):]
    if key.startswith("skips."):
        i, rest = key[len("skips."):].split(".", 1)
        return f"encoder{int(i) + 2}.{rest}"
    if key.startswith("ups."):
        i, rest = key[len("ups."):].split(".", 1)
        return f"decoder{levels + 1 - int(i)}.{rest}"
    return key


class Projector(nn.Module):
    """MixCL projector sigma^l: 1x1(x1) convolutions [c -> c -> c -> 2c] with norm + activation between."""

    def __init__(self, spatial_dims: int, channels: int, norm: str = "batch") -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norms = {"batch": nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d,
                 "instance": nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d}
        if norm not in norms:
            raise ValueError(f"projector norm must be one of {sorted(norms)}, got {norm!r}")
        make_norm = norms[norm]
        self.net = nn.Sequential(
            conv(channels, channels, 1), make_norm(channels), nn.ReLU(inplace=True),
            conv(channels, channels, 1), make_norm(channels), nn.ReLU(inplace=True),
            conv(channels, 2 * channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
