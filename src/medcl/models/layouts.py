"""Weight layouts: medcl's MONAI ResNet-18 <-> torchvision / timm ``resnet18``, exactly.

medcl's ResNet-18 (:func:`medcl.models.backbones.resnet18_backbone`: MONAI's ``ResNet`` with a
stride-2 7x7 stem) has the same modules and key names as torchvision's ``resnet18`` (and timm's,
which shares torchvision's layout), except:

- MONAI's shortcut convolutions carry a bias (``layerN.0.downsample.0.bias``, MONAI's default
  ``bias_downsample=True``); torchvision's have none. A BatchNorm follows each of them, so the
  bias is folded into it exactly: ``running_mean -= bias``. In eval mode the outputs are
  identical; in training mode BatchNorm subtracts the batch mean, so a constant bias never
  changed the output or any other gradient, and the running statistics stay consistent.
- medcl's grayscale stem takes 1 input channel; torchvision's takes RGB. For an image replicated
  to RGB, ``conv(W_rgb, [x, x, x]) = conv(sum_c W_rgb[:, c], x)``: RGB -> gray sums the input
  channels (exact), gray -> RGB divides by 3 and replicates (exact for replicated gray inputs).
- torchvision has a classifier ``fc`` (1000 ImageNet classes); a medcl backbone has none. Exports
  leave ``fc`` out: load them with ``net.fc = torch.nn.Identity()`` (torchvision) or
  ``timm.create_model("resnet18", num_classes=0)`` (timm), then ``load_state_dict(..., strict=True)``.

MONAI's ``FlexibleUNet`` with ``backbone="resnet18"`` uses shortcut type A (no shortcut
convolutions at all), a different network: a ResNet-18 state dict cannot load into it exactly.

ImageNet weights expect per-channel normalised RGB. Folded to one gray channel, the exact
equivalent input is a gray image normalised with one mean / std, the same for the three
replicated channels: :data:`IMAGENET_GRAY_MEAN` / :data:`IMAGENET_GRAY_STD` (the averages of
ImageNet's channel statistics, the usual choice for grayscale inputs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

IMAGENET_GRAY_MEAN = (0.449,)  # mean of ImageNet's RGB means (0.485, 0.456, 0.406)
IMAGENET_GRAY_STD = (0.226,)  # mean of ImageNet's RGB stds (0.229, 0.224, 0.225)
LAYOUTS = ("monai", "torchvision")
DOWNSAMPLE_BIAS = ".downsample.0.bias"


class LayoutError(ValueError):
    """A state dict that is not in the layout it was said to be (names the keys)."""


def adapt_conv1(state: Mapping[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """Change ``conv1.weight``'s input channels: RGB -> gray sums them, gray -> RGB divides by
    ``in_channels`` and replicates (both exact for replicated-gray images)."""
    state = dict(state)
    weight = state["conv1.weight"]
    have = weight.shape[1]
    if have == in_channels:
        return state
    if in_channels == 1:
        state["conv1.weight"] = weight.sum(dim=1, keepdim=True)
    elif have == 1:
        state["conv1.weight"] = (weight / in_channels).repeat(1, in_channels, *([1] * (weight.ndim - 2)))
    else:
        raise LayoutError(f"conv1 has {have} input channels: cannot adapt it to {in_channels} (only to / from 1)")
    return state


def monai_to_torchvision(state: Mapping[str, torch.Tensor], in_channels: int | None = None) -> dict[str, torch.Tensor]:
    """medcl/MONAI ResNet state dict -> torchvision ``resnet18`` layout (no ``fc``), exactly."""
    out = {k: v.detach().clone() for k, v in state.items() if not k.endswith(DOWNSAMPLE_BIAS)}
    if "conv1.weight" not in out:
        raise LayoutError(f"not a ResNet state dict: no conv1.weight (keys {sorted(state)[:5]} ...)")
    for key, bias in state.items():
        if key.endswith(DOWNSAMPLE_BIAS):
            bn = key[: -len(DOWNSAMPLE_BIAS)] + ".downsample.1.running_mean"
            if bn not in out:
                raise LayoutError(f"{key} has no BatchNorm {bn} to fold into")
            out[bn] = out[bn] - bias.detach().to(out[bn].dtype)
    return adapt_conv1(out, in_channels) if in_channels is not None else out


def torchvision_to_monai(state: Mapping[str, torch.Tensor], in_channels: int | None = 1) -> dict[str, torch.Tensor]:
    """torchvision / timm ``resnet18`` state dict -> medcl's MONAI ResNet-18 (``fc`` dropped, a zero
    shortcut bias added, conv1 folded to ``in_channels``)."""
    if "conv1.weight" not in state or any(k.endswith(DOWNSAMPLE_BIAS) for k in state):
        raise LayoutError("not a torchvision / timm resnet state dict (expected conv1.weight and shortcut "
                          f"convolutions without bias; keys {sorted(state)[:5]} ...)")
    out = {k: v.detach().clone() for k, v in state.items() if not k.startswith("fc.")}
    for key in list(out):
        if key.endswith(".downsample.0.weight"):
            out[key[: -len("weight")] + "bias"] = torch.zeros(out[key].shape[0], dtype=out[key].dtype)
    return adapt_conv1(out, in_channels) if in_channels is not None else out


def looks_like_torchvision_resnet(state: Mapping[str, torch.Tensor]) -> bool:
    """A plain state dict in torchvision / timm ResNet layout (not a medcl file)."""
    return ("conv1.weight" in state and "layer1.0.conv1.weight" in state
            and not any(k.endswith(DOWNSAMPLE_BIAS) for k in state))
