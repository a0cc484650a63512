"""One ultrasound encoder from videos and pixel labels together: USCL + MixCL-CNN on ONE ResNet-18.

    per step:  a USCL batch (video pairs, I1 + I2, CE on the labeled videos)      -> L_video
               a MixCL batch from the pixel-labeled pool (views V1, V1', V2)     -> L_pixel
    L = weight_video * L_video + weight_pixel * L_pixel
    L_video = L_con + lambda_sup * L_sup                         (methods/uscl.py)
    L_pixel = L_id + alpha * L_label + beta * L_recon            (methods/mixcl_cnn.py)

The two sub-methods are built as usual and then share one backbone (``backbone``, exported like
any ResNet-18); their heads (USCL's projection and classifier, MixCL's stage projectors and the
U-Net decoder) are registered here once, so the state dict holds each tensor once. Every step holds
both batches (the *mixed* schedule): each rank runs the same graph every step, which is what DDP
needs (an alternating schedule would leave one set of heads without gradients on every other step).
BatchNorm statistics of the shared encoder see both kinds of images.

Data: the ``data`` / ``sampling`` / ``augment`` / ``model`` sections describe the videos exactly as
for USCL; ``joint.pixel`` is a ``mixcl_cnn:`` section (pool datasets, patch size, views, MixCL
terms; 2D) and ``joint.pixel_batch_size`` its batch size (``optim.batch_size`` is the video batch).
An epoch is one pass over the videos; the pool is cycled alongside (its own epochs), and the loader
state holds both streams, so a resumed run continues both exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field, field_validator
import torch
from torch import Tensor, nn

from medcl.config import USCLConfig
from medcl.methods.base import Method
from medcl.methods.mixcl_cnn import MixCLCNN, MixCLCNNConfig, from_section
from medcl.methods import uscl
from medcl.methods.uscl import USCL


class JointConfig(USCLConfig):
    """The ``joint:`` section (preset configs/joint-2d.yaml): USCL's terms plus these."""

    weight_video: float = Field(1.0, ge=0.0)
    weight_pixel: float = Field(1.0, ge=0.0)
    pixel_batch_size: int = Field(8, ge=2)  # pooled images per step (each gives V1, V1', V2)
    # log grad_video / grad_pixel: the norm of each WEIGHTED loss's gradient on the shared encoder
    # (one extra backward pass each): which stream drives the encoder, to set the weights from
    log_grad_norms: bool = False
    pixel: MixCLCNNConfig

    @field_validator("pixel")
    @classmethod
    def _two_dimensional(cls, value: MixCLCNNConfig) -> MixCLCNNConfig:
        if value.spatial_dims != 2:
            raise ValueError("the joint encoder is the 2D ResNet-18 of the videos: pixel.spatial_dims must be 2")
        return value


class Joint(Method):
    """See the module docstring."""

    name: ClassVar[str] = "joint"

    def __init__(self, video: USCL, pixel: MixCLCNN, weight_video: float = 1.0, weight_pixel: float = 1.0,
                 log_grad_norms: bool = False) -> None:
        super().__init__()
        if video.backbone_spec["name"] != "resnet18":
            raise ValueError(f"the joint encoder is a resnet18 (MixCL-CNN's stages), got {video.backbone_spec['name']!r}")
        self.backbone = video.backbone
        self.backbone_spec = video.backbone_spec
        pixel.backbone = self.backbone  # one encoder for both terms
        self.video_heads = nn.ModuleDict({n: m for n, m in video.named_children() if n != "backbone"})
        self.pixel_heads = nn.ModuleDict({n: m for n, m in pixel.named_children() if n != "backbone"})
        for part in (video, pixel):
            if any(True for _ in part.named_buffers(recurse=False)) or any(True for _ in part.named_parameters(recurse=False)):
                raise ValueError(f"{type(part).__name__} holds tensors outside its child modules: not composable here")
        object.__setattr__(self, "_parts", (video, pixel))  # plain references: their modules are registered above
        self.weight_video, self.weight_pixel = weight_video, weight_pixel
        self.log_grad_norms = log_grad_norms
        self.metadata = {"video": dict(video.metadata), "pixel": dict(pixel.metadata)}

    def train(self, mode: bool = True) -> Joint:
        super().train(mode)
        for part in self._parts:  # their own `training` flags (children already follow)
            part.training = mode
        return self

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        video, pixel = self._parts
        out_video = video.training_step(batch["video"])
        out_pixel = pixel.training_step(batch["pixel"])
        weighted = {"grad_video": self.weight_video * out_video["loss"], "grad_pixel": self.weight_pixel * out_pixel["loss"]}
        loss = weighted["grad_video"] + weighted["grad_pixel"]
        logged = {f"video_{k}": v.detach() for k, v in out_video.items()}
        logged.update({f"pixel_{k}": v.detach() for k, v in out_pixel.items()})
        if self.log_grad_norms and torch.is_grad_enabled():
            logged.update({k: v.detach() for k, v in self.backbone_gradient_norms(weighted).items()})
        return {"loss": loss, **logged}


class JointLoader:
    """A batch of each stream per step: ``{"video": ..., "pixel": ...}``. ``len`` = the video
    loader's; the pixel loader's batches continue across video epochs (global step g takes pixel
    batch g of the pool's own epoch sequence), so any (epoch, start) is reproducible."""

    def __init__(self, video, pixel) -> None:
        self.video, self.pixel = video, pixel

    def __len__(self) -> int:
        return len(self.video)

    def _pixel_stream(self, first: int) -> Iterator[Any]:
        n = len(self.pixel)
        epoch, start = divmod(first, n)
        while True:
            yield from self.pixel.epoch_batches(epoch, start)
            epoch, start = epoch + 1, 0

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        pixel = self._pixel_stream(epoch * len(self.video) + start)
        for batch in self.video.epoch_batches(epoch, start):
            yield {"video": batch, "pixel": next(pixel)}

    def state_dict(self) -> dict[str, Any]:
        return {"video": self.video.state_dict(), "pixel": self.pixel.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.video.load_state_dict(state["video"])
        self.pixel.load_state_dict(state["pixel"])


def build(config, *, rank: int = 0, world_size: int = 1):
    """``(method, loader)``: USCL's frame-set loader and MixCL-CNN's pool loader, one encoder."""
    from medcl.methods import mixcl
    from medcl.sampling.pairs import frame_set_loader

    p: JointConfig = config.params
    video_loader, _, classes = frame_set_loader(config, rank=rank, world_size=world_size)
    pixel_loader, pixel_metadata = mixcl.pool_loader(config, rank=rank, world_size=world_size, params=p.pixel,
                                                     batch_size=p.pixel_batch_size)
    video = uscl.from_config(config, classes)
    pixel = from_section(p.pixel, in_channels=config.data.in_channels)
    pixel.metadata = pixel_metadata
    return Joint(video, pixel, p.weight_video, p.weight_pixel, p.log_grad_norms), JointLoader(video_loader, pixel_loader)
