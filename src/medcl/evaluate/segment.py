"""Segmentation fine-tuning: the segmentation task adapter on the one fine-tuning protocol.

The MixCL protocol (Li, Quan, Zhou; METHODS.md section 2): a UNETR (2D or 3D; ``arch='unetr'``,
the default) is initialised from a pretrained encoder (a MixCL checkpoint, run folder or export,
read by :mod:`medcl.weights`) or from scratch; ``arch='unet'`` is a 2D U-Net on medcl's ResNet-18
backbone (:mod:`medcl.models.unet`; any resnet18 init, with its input convention). Either is
fine-tuned with Dice + cross-entropy (MONAI ``DiceCELoss``) on a *label fraction*
of the labeled training patients, model-selected on validation patients, and scored with
per-class Dice on the held-out fold (k-fold by patient) and on an optional separate test set::

    for fold in folds:                          # patient-level folds (predefined or seeded)
        test = patients of this fold; rest -> validation patients (seeded) + training pool
        for fraction in (5, 15, 50, 100 %):     # nested subsets of the pool's patients
            fine-tune N iterations, keep the weights with the best validation mean Dice
            post-processing per class (largest connected component or not), decided on validation
            Dice on the fold's test cases (+ the task's separate test cases)
    report mean +- std over folds

What is shared with classification lives in :mod:`medcl.evaluate.protocol` (the training loop
with validation-based selection and the trainer's LR schedule, the run folder, several inits on
the same folds) and :mod:`medcl.data.splits` (folds, validation patients, label fractions); what
is here is the task's own: data (:mod:`medcl.data.seg_manifest`), model (UNETR), loss, crops and
the metrics (Dice, voxel precision / recall). Volumes are predicted with
``monai.inferers.sliding_window_inference``; training draws random crops centred on foreground
with probability ``pos_fraction``.

A run folder holds ``config.yaml``, ``results.json``, ``results.md``, ``curves.jsonl``,
``predictions.csv`` (one row per test case: fold, fraction, split, case, patient, Dice per class)
and ``overlays/*.npz`` (keys ``image`` float32 [H, W] in [0, 1], ``pred`` and ``gt`` uint8
[H, W] class indices, ``classes`` the foreground names, ``dice`` per-class Dice of that case; 3D
cases store the axial slice with the most ground-truth foreground) and ``models/`` (each
(fold, fraction) model with its model card, :mod:`medcl.evaluate.models`; ``save_models=False``
keeps none). Python:
``finetune(task, ["scratch", "mixcl=RUN"], SegmentConfig(...), out)``; one init:
``run_segmentation(task, SegmentConfig(...), out)``. Command line: ``medcl finetune DATA --task segment``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from medcl.data.seg_manifest import (
    SegCase,
    SegTask,
    busbra_task,
    load_case,
    openkbp_task,
    read_seg_csv,
)
from medcl.data.splits import kfold_by_patient, select_label_fraction, split_patients
from medcl.evaluate.metrics import fmt as _fmt_stat
from medcl.evaluate.metrics import mean_std
from medcl.evaluate.models import (
    ARCHITECTURES,
    UNET_SEGMENTER,
    UNETR_SEGMENTER,
    base_card,
    finish_models,
    models_folder,
    save_finetuned,
)
from medcl.evaluate.protocol import RunResult, Schedule, Validation, compare_inits, train_with_selection, write_run
from medcl.inputs import InputSpec
from medcl.precision import autocast, channels_last, make_optimizer, resolve_precision
from medcl.weights import InitSpec, MissingWeightsError, WeightsError, load_init

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


# The CNN U-Net recipe measured by benchmarks/segment_2d.py (BUS-BRA) and segment_3d.py (OpenKBP): what
# ``arch: unet`` uses for each of these fields the config leaves unset (the plain field defaults below are the
# UNETR's, MixCL's paper setting). The budget applies only when neither ``iterations`` nor ``epochs`` is given.
UNET_RECIPE: dict[int, dict[str, Any]] = {
    2: {"batch_size": 16, "lr": 1e-3, "weight_decay": 1e-4, "augment": "monai"},
    3: {"batch_size": 2, "lr": 1e-3, "weight_decay": 1e-4, "augment": "flips", "pos_fraction": 0.67},
}
# 2D: 20 epochs (BUS-BRA, 100% of ~1200 images: validation Dice 0.853 at 8 epochs -> 0.869, test 0.842 -> 0.861,
# all five folds, benchmarks/results/segment_2d_scratch_100.md); small label fractions train the 350-step floor.
UNET_BUDGET: dict[int, dict[str, Any]] = {
    2: {"epochs": 20.0, "min_iterations": 350, "max_validations": 12},
    3: {"epochs": 120.0, "min_iterations": 1200, "max_validations": 5},
}


class SegmentConfig(BaseModel):
    """Everything a segmentation fine-tune run depends on (written to config.yaml). With ``arch:
    unet``, :meth:`for_task` fills the fields left unset from :data:`UNET_RECIPE` / :data:`UNET_BUDGET`."""

    model_config = ConfigDict(extra="forbid")

    size: list[int] | None = Field(
        default=None, description="2D: resize every image to this; 3D: resample volumes (None keeps)"
    )
    roi_size: list[int] | None = Field(
        default=None, description="training crop and sliding-window size; None = the whole image"
    )
    sw_roi_size: list[int] | None = Field(
        default=None, description="arch unet: a bigger sliding-window tile at inference than the training crop "
                                  "(the U-Net is fully convolutional; fewer, larger tiles are faster); None = roi_size")
    model: dict[str, Any] = Field(
        default_factory=dict, description="UNETR kwargs (hidden_size, num_layers, num_heads, ...)"
    )
    checkpoint: str | None = Field(default=None, description="init: a MixCL checkpoint, run folder or export; None = scratch")
    iterations: int = 2000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.05
    val_every: int = 100
    fractions: list[float] = Field(default_factory=lambda: [0.05, 0.15, 0.5, 1.0])
    folds: list[int] | None = Field(default=None, description="1-based folds to run; None = all")
    n_folds: int = 5
    val_fraction: float = 0.2
    max_val_cases: int | None = None
    pos_fraction: float = 0.5
    dice_background: bool = False  # include the background channel in the Dice part of the loss
    class_weights: list[float] | None = Field(
        default=None, description="one weight per class, background first, for both terms of the loss (MONAI "
                                  "DiceCELoss ``weight``): > 1 for a small structure the loss would otherwise "
                                  "let the model ignore; None = all 1")
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    nsd_tolerance: float = Field(default=2.0, gt=0, description="NSD tolerance in pixels / voxels of the model grid")
    n_overlays: int = 2
    seed: int = 0
    num_threads: int | None = None
    tensorboard: bool = False  # also write the curves as TensorBoard scalars under RUN/tb
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # medcl.precision: bf16 autocast where native
    save_models: bool = Field(default=True, description="keep each (fold, fraction) model in RUN/models/ with a model card")
    arch: Literal["unetr", "unet"] = Field(
        default="unetr", description="unetr (MixCL's ViT encoder) or unet (2D or 3D U-Net on the ResNet-18 backbone)")
    augment: Literal["flips", "monai"] = Field(
        default="flips", description="flips (random in-plane flips) or monai (in-plane flips, small affine, intensity "
                                     "scale / shift; 2D and 3D)")
    epochs: float | None = Field(
        default=None, description="budget in epochs of the training cases (iterations = ceil(epochs * n_train / "
                                  "batch_size), validation every epoch); None = iterations / val_every")
    patience: int | None = Field(default=None, description="stop after this many validations without improvement; None = never")
    min_iterations: int | None = Field(
        default=None, description="with epochs: at least this many iterations (small label fractions then train for more "
                                  "epochs instead of a handful of steps); None = epochs alone")
    max_validations: int | None = Field(
        default=None, description="with epochs: validate at most this many times (every k epochs); None = every epoch")
    postprocess: Literal["auto", "none", "largest_component"] = Field(
        default="auto", description="auto: keep only the largest connected component of a class in every prediction "
                                    "when that changes some validation prediction and does not lower the class's "
                                    "validation Dice (nnU-Net's rule, decided per model); largest_component: for every "
                                    "class; none: the raw argmax")

    @model_validator(mode="after")
    def _inference_tile(self) -> SegmentConfig:
        if self.sw_roi_size is not None and self.arch != "unet":
            raise ValueError("sw_roi_size needs arch 'unet' (the UNETR only takes its training roi_size)")
        return self

    def inference_roi(self) -> list[int] | None:
        """The sliding-window tile of validation, test and saved models."""
        return self.sw_roi_size or self.roi_size

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("fractions must not be empty")
        for f in v:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"each fraction must be in (0, 1], got {f}")
        return sorted(v)

    @field_validator("val_fraction", "warmup_fraction", "pos_fraction")
    @classmethod
    def _unit_interval(cls, v: float) -> float:
        if not 0.0 <= v < 1.0 + 1e-9:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v

    @field_validator("iterations", "batch_size", "val_every", "n_folds", "sw_batch_size", "patience", "min_iterations",
                     "max_validations")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(w > 0 for w in v):
            raise ValueError(f"each class weight must be > 0, got {v}")
        return v

    @field_validator("epochs")
    @classmethod
    def _positive_epochs(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    def for_task(self, spatial_dims: int) -> SegmentConfig:
        """The config a run on ``spatial_dims``-D data uses: itself, except that ``arch: unet`` takes the
        measured U-Net recipe for every recipe field not set explicitly (by the caller, a config file or
        a flag), and its budget in epochs unless ``iterations`` or ``epochs`` was given."""
        if self.arch != "unet":
            return self
        given = self.model_fields_set
        update = {k: v for k, v in UNET_RECIPE[spatial_dims].items() if k not in given}
        if not {"iterations", "epochs"} & given:
            update.update({k: v for k, v in UNET_BUDGET[spatial_dims].items() if k not in given})
        return self.model_copy(update=update) if update else self


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

# A small ViT that trains on two CPU cores; pass the paper's ViT-B/16 via ``model`` on a GPU.
DEFAULT_MODEL: dict[str, Any] = {
    "patch_size": 8,
    "hidden_size": 96,
    "mlp_dim": 384,
    "num_layers": 6,
    "num_heads": 4,
    "feature_size": 8,
}
# checkpoint ``backbone.kwargs`` that describe the input, not the encoder architecture
_INPUT_KEYS = ("spatial_dims", "in_channels", "img_size", "out_channels", "qkv_bias")


def build_segmentation_model(
    spatial_dims: int, img_size: Sequence[int], in_channels: int, out_channels: int, **model_kwargs
) -> nn.Module:
    """UNETR (``medcl.models.unetr``; encoder at ``.encoder``) with :data:`DEFAULT_MODEL` defaults."""
    from medcl.models.unetr import build_unetr

    kwargs = {**DEFAULT_MODEL, **model_kwargs}
    return build_unetr(
        spatial_dims=spatial_dims, img_size=tuple(img_size), in_channels=in_channels,
        out_channels=out_channels, **kwargs,
    )


# each segmentation architecture: (the backbone registry's encoder it builds on, its model-file name)
SEGMENTERS = {"unetr": ("unetr_encoder", UNETR_SEGMENTER), "unet": ("resnet18", UNET_SEGMENTER)}


def load_encoder_checkpoint(path: str | Path, arch: str = "unetr",
                            spatial_dims: int = 2) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(encoder state dict, encoder kwargs) of an init (checkpoint, run folder,
    export; for ``unet`` also a torchvision / timm resnet18 file), read by
    :func:`medcl.weights.load_init`. An encoder of another architecture than ``arch`` builds on is
    an error naming both. UNETR: the kwargs are the encoder's architecture (input keys dropped);
    U-Net: the ResNet's ``in_channels`` and the backbone's :class:`~medcl.inputs.InputSpec` (``input``)."""
    expect = SEGMENTERS[arch][0]
    try:
        loaded = load_init(InitSpec("pretrained", str(path)), expect=expect)
    except MissingWeightsError:
        raise
    except WeightsError as exc:
        known = ", ".join(f"--arch {a} on {enc!r}" for a, (enc, _) in SEGMENTERS.items())
        raise WeightsError(f"{exc} (segmentation --arch {arch}; {known})") from None
    if arch == "unet":
        if loaded.kwargs.get("spatial_dims", 2) != spatial_dims:
            raise WeightsError(f"{path}: a {loaded.kwargs.get('spatial_dims', 2)}D resnet18; this {spatial_dims}D task's"
                               f" --arch unet needs a {spatial_dims}D one")
        in_channels = int(loaded.kwargs.get("in_channels", 1))
        return loaded.state, {"in_channels": in_channels, "input": loaded.input.to_dict()}
    kwargs = {k: v for k, v in loaded.kwargs.items() if k not in _INPUT_KEYS}
    return loaded.state, kwargs


def load_encoder_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy pretrained encoder weights into ``model.encoder`` (every key must match; a UNETR's
    position embedding is interpolated when the fine-tuning input size differs)."""
    from medcl.models.unet import ResNetUNet
    from medcl.models.unetr import load_encoder_weights

    try:
        if isinstance(model, ResNetUNet):
            model.encoder.load_state_dict(state, strict=True)
        else:
            load_encoder_weights(model, state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{source}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# sampling, inference, metrics
# ---------------------------------------------------------------------------------------------


def random_crop(
    image: np.ndarray,
    labels: np.ndarray,
    roi_size: Sequence[int],
    pos_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``roi_size`` from channel-first arrays, centred on a foreground voxel of a randomly
    chosen present class with probability ``pos_fraction`` (small organs get seen), else
    anywhere. Arrays smaller than the ROI are zero-padded."""
    spatial = image.shape[1:]
    pad = [(0, 0)] + [(0, max(0, r - s)) for r, s in zip(roi_size, spatial)]
    if any(p[1] for p in pad[1:]):
        image = np.pad(image, pad)
        labels = np.pad(labels, pad)
        spatial = image.shape[1:]
    center = None
    if rng.random() < pos_fraction:
        present = [c for c in np.unique(labels) if c > 0]
        if present:
            cls = present[rng.integers(len(present))]
            coords = np.argwhere(labels[0] == cls)
            center = coords[rng.integers(len(coords))]
    if center is None:
        center = [rng.integers(s) for s in spatial]
    start = [int(np.clip(c - r // 2, 0, s - r)) for c, r, s in zip(center, roi_size, spatial)]
    sl = (slice(None),) + tuple(slice(a, a + r) for a, r in zip(start, roi_size))
    return image[sl], labels[sl]


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, spatial_dims: int):
    """Random flips along the in-plane axes (cheap and anatomy-safe for left/right)."""
    for axis in range(1, 1 + min(spatial_dims, 2)):
        if rng.random() < 0.5:
            image, labels = np.flip(image, axis), np.flip(labels, axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def monai_augmenter(seed: int, spatial_dims: int = 2) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``augment='monai'`` for channel-first (image, labels), 2D ``[1, H, W]`` or 3D ``[1, H, W, D]``:
    random flips of the two in-plane axes, a small affine (rotation up to 15 degrees in the
    (H, W) plane -- the axial plane of a CT -- scale +-10 % on every axis; bilinear for the image,
    nearest for the labels, so both move together), then intensity scale and shift (+-10 %) of the
    image, which is clipped back to [0, 1]. Seeded: the same ``seed`` gives the same draws."""
    from monai.data.meta_obj import get_track_meta, set_track_meta
    from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    keys = ("image", "label")
    # MONAI's 3D rotate_range is (about axis 0, axis 1, axis 2): rotating about the last axis turns the (H, W) plane
    rotate = (math.pi / 12,) if spatial_dims == 2 else (0.0, 0.0, math.pi / 12)
    transform = Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandAffined(keys, prob=0.5, rotate_range=rotate, scale_range=(0.1,) * spatial_dims,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ]).set_random_state(seed=seed)

    def apply(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # plain tensors, not MetaTensors: the outputs become arrays anyway, and MONAI's metadata tracking
        # costs ~40% of the augmentation time (measured: 2.8 -> 1.7 ms per 128 px image); same values
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            out = transform({"image": image, "label": labels})
        finally:
            set_track_meta(tracking)
        image2 = np.clip(np.asarray(out["image"], dtype=np.float32), 0.0, 1.0)
        return np.ascontiguousarray(image2), np.ascontiguousarray(np.asarray(out["label"]).round().astype(labels.dtype))

    return apply


def budget(cfg: SegmentConfig, n_train: int) -> tuple[int, int]:
    """(iterations, iterations per validation period): ``iterations`` / ``val_every``, or with
    ``epochs`` max(ceil(epochs * n_train / batch_size), min_iterations) validated every epoch
    (ceil(n_train / batch_size) iterations), or every k epochs when that would exceed
    ``max_validations``."""
    if cfg.epochs is None:
        return cfg.iterations, cfg.val_every
    per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    total = max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size), cfg.min_iterations or 0)
    period = per_epoch
    if cfg.max_validations is not None and math.ceil(total / period) > cfg.max_validations:
        period = per_epoch * math.ceil(total / (per_epoch * cfg.max_validations))
    return total, period


@torch.no_grad()
def predict(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | None,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Logits [B, C, *spatial] for images [B, 1, *spatial]; sliding window when the image is
    larger than ``roi_size`` (Gaussian-weighted overlap)."""
    from monai.inferers import sliding_window_inference

    if roi_size is None or tuple(image.shape[2:]) == tuple(roi_size):
        return model(image)
    return sliding_window_inference(
        image, tuple(roi_size), sw_batch_size, model, overlap=overlap, mode="gaussian"
    )


def keep_largest_component(label_map: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """A copy of the label map [*spatial] in which each class index in ``classes`` keeps only its
    largest connected component (full connectivity: 8 neighbours in 2D, 26 in 3D); the rest of
    that class becomes background. For structures that are one piece (a mandible, a spinal cord,
    one lesion per image) it removes look-alike islands elsewhere. ``scipy.ndimage.label`` (MONAI's
    ``KeepLargestConnectedComponent`` needs scikit-image, which medcl does not otherwise use)."""
    from scipy import ndimage

    out = np.array(label_map, copy=True)
    structure = ndimage.generate_binary_structure(out.ndim, out.ndim)
    for c in classes:
        components, n = ndimage.label(out == c, structure)
        if n > 1:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            out[(components > 0) & (components != largest)] = 0
    return out


def postprocess_batch(pred: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """:func:`keep_largest_component` on each label map of a batch [B, 1, *spatial]."""
    if not classes:
        return pred
    maps = [keep_largest_component(p[0].cpu().numpy(), classes) for p in pred]
    return torch.from_numpy(np.stack(maps)[:, None]).to(pred.dtype)


def predicted_labels(model: nn.Module, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                     roi_size: Sequence[int] | None, cfg: SegmentConfig):
    """(prediction, ground truth) label-map batches [B, 1, *spatial] of the cases, in order: 2D
    images in batches of 8, volumes one by one; bf16 autocast where ``cfg.precision`` resolves to it."""
    model.eval()
    batch = 8 if not images or images[0].ndim == 3 else 1
    dtype = resolve_precision(cfg.precision, "cpu", model)  # segmentation runs on the CPU (as in finetune_once)
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[start : start + batch]))
        y = torch.from_numpy(np.stack(labels[start : start + batch]))
        with autocast(x.device, dtype):
            logits = predict(model, x, roi_size, cfg.sw_batch_size, cfg.sw_overlap)
        yield x, logits.float().argmax(1, keepdim=True), y


def choose_postprocess(model: nn.Module, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], n_classes: int,
                       roi_size: Sequence[int] | None, cfg: SegmentConfig) -> list[int]:
    """The foreground class indices whose predictions keep only their largest connected component.

    ``cfg.postprocess``: 'none' -> []; 'largest_component' -> every class; 'auto' -> nnU-Net's rule
    on the validation cases: a class is post-processed when that changes at least one validation
    prediction (there was an island to remove) and does not lower the class's mean validation Dice
    (cases without the class in the ground truth are skipped, as in :func:`dice_per_class`)."""
    foreground = list(range(1, n_classes))
    if cfg.postprocess == "none":
        return []
    if cfg.postprocess == "largest_component":
        return foreground
    raw, kept, changed = [], {c: [] for c in foreground}, {c: False for c in foreground}
    for _, pred, y in predicted_labels(model, images, labels, roi_size, cfg):
        raw.append(dice_per_class(pred, y, n_classes))
        for c in foreground:
            post = postprocess_batch(pred, [c])
            changed[c] = changed[c] or bool((post != pred).any())
            kept[c].append(dice_per_class(post, y, n_classes)[:, c - 1])
    if not raw:
        return []
    raw_scores = np.concatenate(raw)
    chosen = []
    for c in foreground:
        before, after = _nanmean(raw_scores[:, c - 1]), _nanmean(np.concatenate(kept[c]))
        if changed[c] and not math.isnan(after) and not after < before:  # NaN: class never in the validation truth
            chosen.append(c)
    return chosen


def dice_per_class(pred: torch.Tensor, gt: torch.Tensor, n_classes: int) -> np.ndarray:
    """Dice of each foreground class for label maps [B, 1, *spatial] -> array [B, n_classes - 1].

    MONAI ``DiceMetric`` (include_background=False, ignore_empty=True): a class absent from the
    ground truth of a case gives NaN for that case, and aggregates skip NaN.
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    out = metric(one_hot(pred.long(), n_classes), one_hot(gt.long(), n_classes))
    return out.cpu().numpy().astype(np.float64)


def surface_metrics(pred: torch.Tensor, gt: torch.Tensor, n_classes: int, tolerance: float) -> np.ndarray:
    """HD95 and NSD of each foreground class for label maps [B, 1, *spatial] -> [B, n_classes - 1, 2].

    MONAI ``compute_hausdorff_distance`` (95th percentile of the symmetric surface distances) and
    ``compute_surface_dice`` (normalised surface Dice: the fraction of both surfaces within
    ``tolerance`` of the other), in pixels / voxels of the model's input grid. A class absent
    from the ground truth gives NaN for both (skipped, as for Dice); a class present but not
    predicted gives NSD 0 and HD95 = the image diagonal (the worst possible distance), not NaN,
    so a model that misses lesions is not rewarded by dropping them from the mean.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from monai.networks.utils import one_hot

    p, g = one_hot(pred.long(), n_classes), one_hot(gt.long(), n_classes)
    with warnings.catch_warnings():  # MONAI warns for empty classes, handled below
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, g, include_background=False, percentile=95).float()
        nsd = compute_surface_dice(p, g, class_thresholds=[float(tolerance)] * (n_classes - 1),
                                   include_background=False).float()
    gt_present = g[:, 1:].flatten(2).any(2)
    pred_present = p[:, 1:].flatten(2).any(2)
    diagonal = float(np.sqrt(sum(s * s for s in pred.shape[2:])))
    hd = torch.where(gt_present & ~pred_present, torch.full_like(hd, diagonal), hd)
    nsd = torch.where(gt_present & ~pred_present, torch.zeros_like(nsd), nsd)
    hd = torch.where(gt_present, hd, torch.full_like(hd, float("nan")))
    nsd = torch.where(gt_present, nsd, torch.full_like(nsd, float("nan")))
    return torch.stack([hd, nsd], dim=2).cpu().numpy().astype(np.float64)


def summarize_surface(surface: np.ndarray, classes: Sequence[str]) -> dict:
    """Class means over cases (NaN skipped) of HD95 and NSD and their means over classes."""
    out: dict[str, Any] = {}
    for j, key in enumerate(("hd95", "nsd")):
        per_class = _nanmean(surface[:, :, j], axis=0) if len(surface) else np.full(len(classes), np.nan)
        out[key] = {c: float(v) for c, v in zip(classes, per_class)}
        out[f"mean_{key}"] = float(_nanmean(per_class))
    return out


def _nanmean(a: np.ndarray, axis: int | None = None):
    """np.nanmean without the all-NaN RuntimeWarning (an all-NaN slice is simply NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def evaluate_cases(
    model: nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    n_classes: int,
    roi_size: Sequence[int] | None,
    cfg: SegmentConfig,
    keep: int = 0,
    surface: list[np.ndarray] | None = None,
    keep_largest: Sequence[int] = (),
    raw: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray]:
    """Per-case, per-class Dice [n_cases, n_classes - 1]; (image, pred, gt) of the first ``keep``
    cases; voxel counts [n_cases, n_classes - 1, 3] (see :func:`voxel_counts`). Given a list
    ``surface``, appends each batch's HD95 / NSD (:func:`surface_metrics`) to it (test sets; the
    validation during training skips them: distance transforms cost more than Dice). Predictions
    are post-processed (:func:`keep_largest_component` of the classes ``keep_largest``) before
    every metric; given a list ``raw``, the Dice before post-processing is appended to it."""
    scores, kept, counts = [], [], []
    for x, pred, y in predicted_labels(model, images, labels, roi_size, cfg):
        if raw is not None:
            raw.append(dice_per_class(pred, y, n_classes))
        pred = postprocess_batch(pred, keep_largest)
        scores.append(dice_per_class(pred, y, n_classes))
        counts.append(voxel_counts(pred, y, n_classes))
        if surface is not None:
            surface.append(surface_metrics(pred, y, n_classes, cfg.nsd_tolerance))
        for j in range(x.shape[0]):
            if len(kept) < keep:
                kept.append((x[j, 0].numpy(), pred[j, 0].numpy().astype(np.uint8), y[j, 0].numpy().astype(np.uint8)))
    if not scores:
        return np.zeros((0, n_classes - 1)), kept, np.zeros((0, n_classes - 1, 3), np.int64)
    return np.concatenate(scores), kept, np.concatenate(counts)


def voxel_counts(pred: torch.Tensor, gt: torch.Tensor, n_classes: int) -> np.ndarray:
    """[B, n_classes - 1, 3] int64: (overlap, predicted, true) voxels of each foreground class."""
    p, g = pred.reshape(pred.shape[0], -1), gt.reshape(gt.shape[0], -1)
    out = [torch.stack([((p == c) & (g == c)).sum(1), (p == c).sum(1), (g == c).sum(1)], dim=1)
           for c in range(1, n_classes)]
    return torch.stack(out, dim=1).cpu().numpy().astype(np.int64)


def precision_recall(counts: np.ndarray, classes: Sequence[str]) -> dict:
    """Voxel precision (overlap / predicted) and recall (overlap / true) of each class, pooled over
    the cases: low precision with high recall is over-segmentation (e.g. look-alike structures
    elsewhere in the volume), the reverse under-segmentation. NaN when the denominator is 0."""
    total = counts.sum(0) if len(counts) else np.zeros((len(classes), 3), np.int64)

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else float("nan")

    return {
        "precision": {c: ratio(total[i, 0], total[i, 1]) for i, c in enumerate(classes)},
        "recall": {c: ratio(total[i, 0], total[i, 2]) for i, c in enumerate(classes)},
    }


def summarize_dice(scores: np.ndarray, classes: Sequence[str]) -> dict:
    """Class means over cases (NaN skipped) and their mean."""
    per_class = _nanmean(scores, axis=0) if len(scores) else np.full(len(classes), np.nan)
    return {
        "n_cases": int(len(scores)),
        "per_class": {c: float(v) for c, v in zip(classes, per_class)},
        "mean_dice": float(_nanmean(per_class)),
    }


# ---------------------------------------------------------------------------------------------
# one fine-tune
# ---------------------------------------------------------------------------------------------


def finetune_once(
    task: SegTask,
    train: tuple[list[np.ndarray], list[np.ndarray]],
    val: tuple[list[np.ndarray], list[np.ndarray]],
    cfg: SegmentConfig,
    encoder_state: dict[str, torch.Tensor] | None,
    model_kwargs: dict[str, Any],
    seed: int,
    on_eval: Callable[[dict], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune one ``cfg.arch`` segmenter with the protocol's loop (a validation every
    :func:`budget` period, warm-up + cosine, early stopping after ``patience`` periods without
    improvement); returns the model with the best-validation weights and a record."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_images, train_labels = train
    spatial = train_images[0].shape[1:]
    roi = tuple(cfg.roi_size) if cfg.roi_size else tuple(spatial)
    architecture = segmenter_kwargs(task, roi, model_kwargs, cfg.arch)
    model = ARCHITECTURES[SEGMENTERS[cfg.arch][1]](**architecture)
    if cfg.arch == "unet":
        channels_last(model)  # medcl.precision: the memory format CNNs prefer on CPUs (same values)
    iterations, val_every = budget(cfg, len(train_images))
    monai_augment = monai_augmenter(int(rng.integers(2**31)), task.spatial_dims) if cfg.augment == "monai" else None
    dtype = resolve_precision(cfg.precision, "cpu", model)  # medcl.precision (segmentation runs on the CPU here)
    if encoder_state is not None:
        load_encoder_into(model, encoder_state, cfg.checkpoint or "checkpoint")
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights is not None else None
    # Dice over foreground classes only and over the whole batch: small organs in crops that miss
    # them would otherwise be swamped by background Dice or give 0/0 per-sample terms
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=cfg.dice_background, batch=True,
                         weight=weight)
    opt = make_optimizer("adamw", model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def period_batches(period: int):
        first = period * val_every + 1
        for _ in range(first, min(first + val_every, iterations + 1)):
            xs, ys = [], []
            for _ in range(cfg.batch_size):
                k = int(rng.integers(len(train_images)))
                img, lab = train_images[k], train_labels[k]
                if roi != tuple(spatial):
                    img, lab = random_crop(img, lab, roi, cfg.pos_fraction, rng)
                if monai_augment is not None:
                    img, lab = monai_augment(img, lab)
                else:
                    img, lab = augment(img, lab, rng, task.spatial_dims)
                xs.append(img)
                ys.append(lab)
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def step_loss(batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        with autocast(x.device, dtype):
            logits = model(x)
        return loss_fn(logits.float(), y), len(x)

    def validate() -> Validation:
        scores, _, _ = evaluate_cases(model, val[0], val[1], task.n_classes, cfg.inference_roi(), cfg)
        if not len(scores):  # no validation cases: keep the newest weights
            return Validation(None, {"val_mean_dice": float("nan")})
        val_dice = summarize_dice(scores, task.classes)["mean_dice"]
        return Validation(val_dice if not math.isnan(val_dice) else -0.5, {"val_mean_dice": val_dice})

    def on_period(row: dict) -> None:
        if on_eval is not None:
            on_eval(_curve_row(row))

    schedule = Schedule(total_steps=iterations, periods=math.ceil(iterations / val_every),
                        warmup_steps=max(1, int(cfg.warmup_fraction * iterations)), patience=cfg.patience)
    selection = train_with_selection(model, opt, schedule, period_batches, step_loss, validate, on_period=on_period)
    return model, {"best_iteration": selection.best_step,
                   "val_mean_dice": selection.best_score if selection.best_score is not None else float("nan"),
                   "curve": [_curve_row(r) for r in selection.curve], "train_seconds": selection.train_seconds,
                   "architecture": SEGMENTERS[cfg.arch][1], "architecture_kwargs": architecture, "iterations": iterations}


def segmenter_kwargs(task: SegTask, roi: Sequence[int], model_kwargs: dict[str, Any], arch: str = "unetr") -> dict[str, Any]:
    """What builds (and, saved with the model, rebuilds) the ``arch`` segmenter of ``task`` on
    ``roi`` inputs (the U-Net is fully convolutional: it takes any input size)."""
    if arch == "unet":
        from medcl.models.unet import DEFAULT_DECODER, DEFAULT_DECODER_3D

        decoder = list(DEFAULT_DECODER if task.spatial_dims == 2 else DEFAULT_DECODER_3D)
        return {"spatial_dims": task.spatial_dims, "out_channels": task.n_classes, "in_channels": 1,
                "input": InputSpec().to_dict(), "decoder": decoder, **model_kwargs}
    return {"spatial_dims": task.spatial_dims, "img_size": [int(r) for r in roi], "in_channels": 1,
            "out_channels": task.n_classes, **{**DEFAULT_MODEL, **model_kwargs}}


def _curve_row(row: dict) -> dict:
    return {"iteration": row["step"], "train_loss": row["train_loss"], "val_mean_dice": row["val_mean_dice"],
            "lr": row["lr"], "seconds": row["seconds"]}


# ---------------------------------------------------------------------------------------------
# the whole protocol
# ---------------------------------------------------------------------------------------------


def _overlay_slice(image: np.ndarray, pred: np.ndarray, gt: np.ndarray):
    """2D arrays as they are; for volumes the axial slice with the most ground-truth foreground."""
    if image.ndim == 2:
        return image, pred, gt
    z = int(np.argmax((gt > 0).reshape(-1, gt.shape[-1]).sum(0))) if gt.any() else gt.shape[-1] // 2
    return image[..., z], pred[..., z], gt[..., z]


def summarize_runs(runs: Sequence[dict], classes: Sequence[str]) -> dict:
    """Mean +- std over folds per label fraction (test fold, external test, validation)."""
    summary: dict[str, dict] = {}
    for fraction in sorted({r["fraction"] for r in runs}):
        rows = [r for r in runs if r["fraction"] == fraction]
        entry = {
            "n_folds": len(rows),
            "n_train_patients": mean_std([r["n_train_patients"] for r in rows]),
            "val_mean_dice": mean_std([r["val_mean_dice"] for r in rows]),
            "test_mean_dice": mean_std([r["test"]["mean_dice"] for r in rows]),
            "test_per_class": {c: mean_std([r["test"]["per_class"][c] for r in rows]) for c in classes},
        }
        if all("test_raw" in r for r in rows):
            entry["test_mean_dice_raw"] = mean_std([r["test_raw"]["mean_dice"] for r in rows])
            entry["test_per_class_raw"] = {c: mean_std([r["test_raw"]["per_class"][c] for r in rows]) for c in classes}
        if all("precision" in r["test"] for r in rows):
            for key in ("precision", "recall"):
                entry[f"test_{key}"] = {c: mean_std([r["test"][key][c] for r in rows]) for c in classes}
        if all("hd95" in r["test"] for r in rows):
            for key in ("hd95", "nsd"):
                entry[f"test_mean_{key}"] = mean_std([r["test"][f"mean_{key}"] for r in rows])
                entry[f"test_{key}_per_class"] = {c: mean_std([r["test"][key][c] for r in rows]) for c in classes}
        if any("external_test" in r for r in rows):
            ext = [r["external_test"] for r in rows if "external_test" in r]
            entry["external_test_mean_dice"] = mean_std([e["mean_dice"] for e in ext])
            entry["external_test_per_class"] = {c: mean_std([e["per_class"][c] for e in ext]) for c in classes}
        summary[f"{fraction:g}"] = entry
    return summary


def fmt(ms: dict, digits: int = 3) -> str:
    """'0.812 +- 0.021' from a {mean, std, n} dict (``medcl.evaluate.metrics.fmt``), '(1 fold)' for one."""
    return _fmt_stat(ms, digits, sep="+-") + (" (1 fold)" if ms.get("n") == 1 else "")


def results_markdown(results: dict) -> str:
    classes = results["task"]["classes"]
    init = results["init"]
    lines = [
        f"# Segmentation fine-tune: {results['task']['name']} ({init})",
        "",
        f"Dice on each held-out patient fold, mean +- std over {results['n_folds_run']} fold(s);"
        " model selected on validation patients.",
        "",
    ]
    ext = any("external_test_mean_dice" in s for s in results["summary"].values())
    header = ["label fraction", "train patients", "val mean Dice", "test mean Dice"] + [f"test {c}" for c in classes]
    if ext:
        header.append("separate test mean Dice")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for frac, s in results["summary"].items():
        row = [
            f"{float(frac) * 100:g}%",
            f"{s['n_train_patients']['mean']:.1f}",
            fmt(s["val_mean_dice"]),
            fmt(s["test_mean_dice"]),
        ] + [fmt(s["test_per_class"][c]) for c in classes]
        if ext:
            row.append(fmt(s.get("external_test_mean_dice", {"n": 0})))
        lines.append("| " + " | ".join(row) + " |")
    post = [r for r in results["runs"] if r.get("postprocess", {}).get("keep_largest_component")]
    if post:
        lines += ["", "Post-processing (chosen per model on its validation patients): each listed class keeps only its"
                  " largest connected component. Test Dice before -> after (the tables report after):", ""]
        header = ["fold", "label fraction", "post-processed"] + [f"{c} before -> after" for c in classes]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in post:
            lines.append(f"| {r['fold']} | {r['fraction'] * 100:g}% | {', '.join(r['postprocess']['keep_largest_component'])} | "
                         + " | ".join(f"{r['test_raw']['per_class'][c]:.3f} -> {r['test']['per_class'][c]:.3f}"
                                      for c in classes) + " |")
    if all("test_hd95_per_class" in s for s in results["summary"].values()):
        lines += ["", f"Surface metrics on the test folds: HD95 (95th percentile Hausdorff distance, lower is better) and"
                  f" NSD (normalised surface Dice at {results.get('nsd_tolerance', 2.0):g} px, higher is better), in pixels /"
                  " voxels of the model's input grid; mean over cases, then mean +- std over folds:", ""]
        header = ["label fraction"] + [f"{c} {k}" for c in classes for k in ("HD95", "NSD")]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for frac, s in results["summary"].items():
            row = [f"{float(frac) * 100:g}%"] + [fmt(s[f"test_{k}_per_class"][c]) for c in classes for k in ("hd95", "nsd")]
            lines.append("| " + " | ".join(row) + " |")
    if all("test_precision" in s for s in results["summary"].values()):
        lines += ["", "Voxel precision / recall on the test folds (pooled over each fold's cases; mean +- std over folds):", ""]
        header = ["label fraction"] + [f"{c} {k}" for c in classes for k in ("precision", "recall")]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for frac, s in results["summary"].items():
            row = [f"{float(frac) * 100:g}%"] + [fmt(s[f"test_{k}"][c]) for c in classes for k in ("precision", "recall")]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _prediction_rows(fold: int, fraction: float, split: str, cases: Sequence[SegCase], scores: np.ndarray,
                     classes: Sequence[str], surface: np.ndarray | None = None) -> list[dict]:
    """One row per case: its Dice per class and their mean (NaN-skipping), for paired comparisons;
    with ``surface`` ([n_cases, n_classes - 1, 2]) also HD95 and NSD per class."""
    rows = []
    for k, (case, dice) in enumerate(zip(cases, scores)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = float(np.nanmean(dice)) if len(dice) else float("nan")
        rows.append({"fold": fold, "fraction": fraction, "split": split, "case_id": case.case_id,
                     "patient_id": case.patient_id, **{f"dice_{c}": float(d) for c, d in zip(classes, dice)},
                     "mean_dice": mean})
        if surface is not None and len(surface) == len(scores):
            rows[-1].update({f"hd95_{c}": float(surface[k, j, 0]) for j, c in enumerate(classes)})
            rows[-1].update({f"nsd_{c}": float(surface[k, j, 1]) for j, c in enumerate(classes)})
    return rows


def run_segmentation(
    task: SegTask,
    cfg: SegmentConfig,
    out_dir: str | Path | None,
    log: Callable[[str], None] | None = print,
    cache: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    init: InitSpec | None = None,
) -> dict:
    """Run the full protocol on ``task`` from one initialisation (``cfg.checkpoint``, or ``init``);
    write the run folder when ``out_dir`` is given.

    ``cache``: a dict to keep loaded (image, labels) arrays in; pass the same dict to several
    runs on the same task and size (e.g. scratch vs pretrained) to decode the data once.
    """
    return _run(task, cfg, out_dir, log, cache, init).results


def _run(task: SegTask, cfg: SegmentConfig, out_dir: str | Path | None, log: Callable[[str], None] | None,
         cache: dict | None, init: InitSpec | None) -> RunResult:
    log = log or (lambda s: None)
    if init is not None:
        cfg = cfg.model_copy(update={"checkpoint": init.path})
    cfg = cfg.for_task(task.spatial_dims)
    init = init or (InitSpec("pretrained", cfg.checkpoint) if cfg.checkpoint else InitSpec("scratch"))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not task.cases:
        raise ValueError(f"task {task.name!r} has no cases")
    if cfg.class_weights is not None and len(cfg.class_weights) != task.n_classes:
        raise ValueError(f"class_weights has {len(cfg.class_weights)} values; task {task.name!r} has "
                         f"{task.n_classes} classes (background + {', '.join(task.classes)})")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "overlays").mkdir(parents=True, exist_ok=True)

    encoder_state, model_kwargs = None, dict(cfg.model)
    if cfg.checkpoint:
        encoder_state, ckpt_kwargs = load_encoder_checkpoint(cfg.checkpoint, cfg.arch, task.spatial_dims)
        # the encoder's architecture (U-Net: and input convention) is the checkpoint's; decoder options stay the config's
        model_kwargs.update(ckpt_kwargs)

    size = tuple(cfg.size) if cfg.size else None
    if task.spatial_dims == 2 and size is None:
        raise ValueError("2D segmentation needs config 'size' (e.g. [64, 64])")
    t_load = time.time()
    cache = {} if cache is None else cache

    def get(case: SegCase) -> tuple[np.ndarray, np.ndarray]:
        key = f"{task.name}|{size}|{task.summary()['intensity']}|{task.channel}|{case.case_id}"
        if key not in cache:
            cache[key] = load_case(case, task, size)
        return cache[key]

    cases = task.cases
    patients = [c.patient_id for c in cases]
    if task.has_predefined_folds():
        fold_of = [int(c.fold) for c in cases]
    else:
        fold_of = kfold_by_patient(patients, cfg.n_folds, cfg.seed)
    all_folds = sorted(set(fold_of))
    folds = cfg.folds or all_folds
    bad = [f for f in folds if f not in all_folds]
    if bad:
        raise ValueError(f"folds {bad} not in the task's folds {all_folds}")

    external = [get(c) for c in task.test_cases]
    runs: list[dict] = []
    curves: list[dict] = []
    predictions: list[dict] = []
    kind = "pretrained" if cfg.checkpoint else "scratch"
    models_dir = models_folder(out, cfg.save_models)
    card = segmentation_card(task, cfg, init, kind) if models_dir is not None else {}
    saved: list[dict] = []  # the model files of this run
    for fold in folds:
        test_idx = [i for i, f in enumerate(fold_of) if f == fold]
        rest_idx = [i for i, f in enumerate(fold_of) if f != fold]
        held, pool = split_patients([patients[i] for i in rest_idx], cfg.val_fraction, cfg.seed * 1000 + fold)
        val_idx = [rest_idx[i] for i in held]
        pool_idx = [rest_idx[i] for i in pool]
        if cfg.max_val_cases is not None:
            val_idx = val_idx[: cfg.max_val_cases]
        val = ([get(cases[i])[0] for i in val_idx], [get(cases[i])[1] for i in val_idx])
        test_imgs = [get(cases[i]) for i in test_idx]
        pool_patients = [patients[i] for i in pool_idx]
        for fraction in cfg.fractions:
            chosen = [pool_idx[i] for i in select_label_fraction(pool_patients, fraction, cfg.seed * 1000 + fold)]
            train = ([get(cases[i])[0] for i in chosen], [get(cases[i])[1] for i in chosen])
            n_train_patients = len({patients[i] for i in chosen})
            log(
                f"[segment {init.name}] fold {fold} fraction {fraction:g}: {len(chosen)} train cases"
                f" ({n_train_patients} patients), {len(val_idx)} val, {len(test_idx)} test"
                f" ({time.time() - t_load:.0f}s elapsed)"
            )

            def on_eval(row: dict, fold=fold, fraction=fraction) -> None:
                curves.append({"fold": fold, "fraction": fraction, **row})

            model, record = finetune_once(
                task, train, val, cfg, encoder_state, model_kwargs, seed=cfg.seed * 1000 + fold, on_eval=on_eval
            )
            keep = cfg.n_overlays if fold == folds[0] else 0
            largest = choose_postprocess(model, val[0], val[1], task.n_classes, cfg.inference_roi(), cfg)
            record["postprocess"] = {"keep_largest_component": [task.classes[c - 1] for c in largest]}
            surface: list[np.ndarray] = []
            raw: list[np.ndarray] = []
            scores, kept, counts = evaluate_cases(
                model, [t[0] for t in test_imgs], [t[1] for t in test_imgs], task.n_classes, cfg.inference_roi(), cfg, keep,
                surface, largest, raw,
            )
            surface_all = np.concatenate(surface) if surface else np.zeros((0, task.n_classes - 1, 2))
            predictions += _prediction_rows(fold, fraction, "test", [cases[i] for i in test_idx], scores, task.classes,
                                            surface_all)
            run = {
                "fold": fold,
                "fraction": fraction,
                "n_train_cases": len(chosen),
                "n_train_patients": n_train_patients,
                "n_val_cases": len(val_idx),
                "iterations": record["iterations"],
                "best_iteration": record["best_iteration"],
                "val_mean_dice": record["val_mean_dice"],
                "train_seconds": record["train_seconds"],
                "postprocess": record["postprocess"],
                "test": {**summarize_dice(scores, task.classes), **precision_recall(counts, task.classes),
                         **summarize_surface(surface_all, task.classes)},
                "test_raw": summarize_dice(np.concatenate(raw) if raw else scores, task.classes),
            }
            if external:
                ext_surface: list[np.ndarray] = []
                ext_scores, _, ext_counts = evaluate_cases(
                    model, [e[0] for e in external], [e[1] for e in external], task.n_classes, cfg.inference_roi(), cfg,
                    surface=ext_surface, keep_largest=largest,
                )
                ext_surface_all = np.concatenate(ext_surface) if ext_surface else np.zeros((0, task.n_classes - 1, 2))
                run["external_test"] = {**summarize_dice(ext_scores, task.classes),
                                        **precision_recall(ext_counts, task.classes),
                                        **summarize_surface(ext_surface_all, task.classes)}
                predictions += _prediction_rows(fold, fraction, "external", task.test_cases, ext_scores, task.classes,
                                                ext_surface_all)
            runs.append(run)
            if models_dir is not None:
                saved.append(_keep_model(model, models_dir, card, run, record, len(test_idx)))
            log(
                f"[segment {init.name}] fold {fold} fraction {fraction:g}: test mean Dice"
                f" {run['test']['mean_dice']:.4f} (best val {record['val_mean_dice']:.4f}"
                f" at it {record['best_iteration']}, {record['train_seconds']:.0f}s)"
            )
            if out is not None:
                for j, (img, pred, gt) in enumerate(kept):
                    img2, pred2, gt2 = _overlay_slice(img, pred, gt)
                    case_id = cases[test_idx[j]].case_id
                    np.savez_compressed(
                        out / "overlays" / f"fold{fold}_frac{fraction * 100:g}_{case_id}.npz",
                        image=img2.astype(np.float32),
                        pred=pred2.astype(np.uint8),
                        gt=gt2.astype(np.uint8),
                        classes=np.array(task.classes),
                        dice=scores[j].astype(np.float32),
                    )
            del model

    results = {
        "format": "medcl-segment-results-v1",
        "task": task.summary(),
        "init": kind,
        "init_spec": init.to_dict(),
        "checkpoint": cfg.checkpoint,
        "model": {**DEFAULT_MODEL, **model_kwargs} if cfg.arch == "unetr" else {"arch": "unet", **model_kwargs},
        "n_folds_run": len(folds),
        "nsd_tolerance": cfg.nsd_tolerance,
        "runs": runs,
        "summary": summarize_runs(runs, task.classes),
    }
    if models_dir is not None:
        card["cross_validation"] = results["summary"]
        finish_models(models_dir, card, saved, lambda entry: results["summary"][f"{entry['fraction']:g}"])
    if out is not None:
        config = {"task": "segment", "data": task.summary(), "segment": cfg.model_dump(), "init": init.to_dict(),
                  "resolved_model": model_kwargs}
        write_run(out, config, results, curves, predictions, results_markdown(results),
                  tensorboard=("iteration", ("fold", "fraction")) if cfg.tensorboard else None)
    return RunResult(init.name, out, results, predictions)


def segmentation_card(task: SegTask, cfg: SegmentConfig, init: InitSpec, kind: str) -> dict:
    """The card fields every model of a segmentation run shares (see :mod:`medcl.evaluate.models`)."""
    if task.spatial_dims == 2:
        inputs = {"kind": "2D images (PNG, JPEG, BMP, TIFF)", "spatial_dims": 2, "size": cfg.size,
                  "description": f"grayscale (8-bit / 255, 16-bit min-max) in [0, 1], resized to {cfg.size} "
                                 "(bilinear); masks come back at the image's own size (nearest)"}
    else:
        intensity = (f"clipped to the window {list(task.intensity_range)}" if task.intensity_range is not None
                     else f"clipped to each volume's {list(task.percentiles)} percentiles")
        inputs = {"kind": "3D NIfTI volumes (.nii, .nii.gz)", "spatial_dims": 3, "size": cfg.size,
                  "window": list(task.intensity_range) if task.intensity_range is not None else None,
                  "percentiles": list(task.percentiles), "channel": task.channel,
                  "description": f"RAS orientation, {intensity} and scaled to [0, 1]"
                                 + (f", channel {task.channel} of 4D images" if task.channel is not None else "")
                                 + (f", resampled to {cfg.size} (trilinear)" if cfg.size else "")
                                 + "; masks come back in the volume's own grid and affine (nearest)"}
    inputs["sliding_window"] = {"roi_size": cfg.inference_roi(), "sw_batch_size": cfg.sw_batch_size, "overlap": cfg.sw_overlap}
    cases = [[c.case_id, c.patient_id, c.image, c.mask, c.fold] for c in [*task.cases, *task.test_cases]]
    every = (f"every epoch of {cfg.epochs:g} epochs" if cfg.epochs is not None
             else f"every {cfg.val_every} of {cfg.iterations} iterations")
    stop = f", stopping after {cfg.patience} validations without improvement" if cfg.patience else ""
    selection = (f"Each (fold, label fraction) model is the iteration with the best validation mean Dice on patients "
                 f"carved from that fold's training folds (validated {every}{stop}), then tested once on the "
                 "fold's held-out patients.")
    data = {"task": task.summary(), "case_list_sha256": hashlib.sha256(json.dumps(cases).encode()).hexdigest(),
            "case_list": "sha256 of the JSON list [case_id, patient_id, image, mask, fold] of every case"}
    return base_card("segment", task.classes, inputs, {**init.to_dict(), "kind": kind}, selection, data,
                     prediction="class index per pixel / voxel (argmax of the softmax), 0 = background; the classes in "
                                "model.postprocess.keep_largest_component then keep only their largest connected component")


def _keep_model(model: nn.Module, folder: Path, card: dict, run: dict, record: dict, n_test: int) -> dict:
    fold, fraction = run["fold"], run["fraction"]
    entry = {"file": f"fold{fold}_frac{fraction * 100:g}.safetensors", "fold": fold, "fraction": fraction,
             "best_iteration": record["best_iteration"],
             "selection": f"fold {fold}, {fraction * 100:g}% of the training patients ({run['n_train_patients']}): "
                          f"iteration {record['best_iteration']} (validation mean Dice {record['val_mean_dice']:.3f})"
                          + "".join(f"; {c} keeps its largest connected component"
                                    for c in record["postprocess"]["keep_largest_component"]),
             "test": f"mean Dice {run['test']['mean_dice']:.3f} ({n_test} held-out cases)",
             "postprocess": record["postprocess"]}
    kwargs = record["architecture_kwargs"]
    save_finetuned(model, folder / entry["file"], record["architecture"], kwargs,
                   {**card, "model": {**entry, "test_metrics": run["test"]}}, InputSpec.from_dict(kwargs.get("input")))
    return entry


def comparison_markdown(results_by_init: dict[str, dict]) -> str:
    """Side-by-side table: test mean Dice (mean +- std over folds) per label fraction and
    initialisation, and the mean paired per-fold difference to the first (baseline) one."""
    names = list(results_by_init)
    base = names[0]
    fractions = list(next(iter(results_by_init.values()))["summary"])
    header = ["label fraction"] + [f"{n} test Dice" for n in names] + [f"{n} - {base} (paired)" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for frac in fractions:
        row = [f"{float(frac) * 100:g}%"]
        for n in names:
            s = results_by_init[n]["summary"].get(frac)
            row.append(fmt(s["test_mean_dice"]) if s else "n/a")
        base_runs = {r["fold"]: r["test"]["mean_dice"] for r in results_by_init[base]["runs"] if f"{r['fraction']:g}" == frac}
        for n in names[1:]:
            other = {r["fold"]: r["test"]["mean_dice"] for r in results_by_init[n]["runs"] if f"{r['fraction']:g}" == frac}
            diffs = [other[f] - base_runs[f] for f in base_runs if f in other]
            d = mean_std(diffs)
            spread = f" +- {d['std']:.3f}" if d["n"] > 1 else ""
            row.append(f"{d['mean']:+.3f}{spread} ({sum(x > 0 for x in diffs)}/{len(diffs)} folds better)"
                       if d["n"] else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def surface_comparison_markdown(results_by_init: dict[str, dict]) -> str:
    """Mean HD95 and NSD over classes (mean +- std over folds) per label fraction and init; '' when
    the runs did not record them."""
    summaries = [s for r in results_by_init.values() for s in r["summary"].values()]
    if not summaries or not all("test_mean_hd95" in s for s in summaries):
        return ""
    names = list(results_by_init)
    header = ["label fraction"] + [f"{n} {k}" for n in names for k in ("HD95", "NSD")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for frac in next(iter(results_by_init.values()))["summary"]:
        row = [f"{float(frac) * 100:g}%"]
        for n in names:
            s = results_by_init[n]["summary"].get(frac)
            row += [fmt(s["test_mean_hd95"], 2), fmt(s["test_mean_nsd"])] if s else ["n/a", "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# several initialisations on the same folds (the Python API behind `medcl finetune --task segment`)
# ---------------------------------------------------------------------------------------------


def finetune(
    task: SegTask,
    inits: Sequence[str | InitSpec] = ("scratch",),
    config: SegmentConfig | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    cache: dict | None = None,
    n_boot: int = 2000,
    overwrite: bool = False,
) -> dict:
    """Fine-tune every initialisation on the SAME folds, label fractions and cases; with several,
    write ``comparison.md`` / ``comparison.json`` (per-fold paired differences and a bootstrap over
    patients) against the first.

    ``out`` is the run folder for one init, or the parent of ``out/<init name>/`` for several;
    results already there are refused unless ``overwrite``. Every init is opened and checked
    before the first fine-tune starts.
    Returns ``{"runs": {name: results}, "comparison": dict | None}``.
    """
    from medcl.evaluate.compare import compare_segmentation

    config = config or SegmentConfig()
    cache = {} if cache is None else cache

    def run_one(init: InitSpec, run_out: Path | None) -> RunResult:
        return _run(task, config, run_out, log, cache, init)

    def compare(runs: list[RunResult]) -> dict:
        result = compare_segmentation([r.predictions for r in runs], [r.init for r in runs], n_boot=n_boot,
                                      seed=config.seed)
        result["results"] = {r.init: r.results for r in runs}
        return result

    def check(init: InitSpec) -> None:
        if init.per_fold:
            raise ValueError(f"initialisation {init.name!r}: per-fold paths ({init.path}) are supported by "
                             "classification fine-tuning only")
        if init.path is not None:
            load_encoder_checkpoint(init.path, config.arch, task.spatial_dims)

    return compare_inits(inits, run_one, compare, write_segmentation_comparison, out, check=check, overwrite=overwrite)


def write_segmentation_comparison(result: dict, out: Path) -> None:
    """``comparison.md`` (per-fold table + bootstrap table) and ``comparison.json``."""
    from medcl.evaluate.compare import segmentation_comparison_markdown

    results = result["results"]
    name = next(iter(results.values()))["task"]["name"]
    out.mkdir(parents=True, exist_ok=True)
    surface = surface_comparison_markdown(results)
    if surface:
        surface = ("\nHD95 (pixels / voxels of the model grid, lower is better) and NSD (higher is better), mean over"
                   f" classes:\n\n{surface}\n")
    (out / "comparison.md").write_text(f"# {name}: initialisations compared\n\n{comparison_markdown(results)}\n"
                                       + surface + segmentation_comparison_markdown(result))
    (out / "comparison.json").write_text(json.dumps(
        {**{k: v for k, v in result.items() if k != "results"}, "summary": {n: r["summary"] for n, r in results.items()}},
        indent=2))


def build_task(
    source: str,
    path: str | Path,
    organs: Sequence[str] | None = None,
    patients: Sequence[str] | None = None,
    test_patients: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    test_manifest: str | Path | None = None,
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] | None = None,
    channel: int | None = None,
    binarize: int | None = None,
) -> SegTask:
    """A task from a named source ('busbra', 'openkbp', 'csv' manifest, or 'auto' to detect), with
    an optional separate test set (a CSV manifest), the 3D intensity options (see
    :func:`set_intensity`) and ``binarize`` (foreground = mask value > it; for noisy 8-bit masks)."""
    task = _source_task(source, path, organs, patients, test_patients, classes)
    if binarize is not None:
        if len(task.classes) != 1:
            raise ValueError(f"--binarize makes one foreground class, but task {task.name!r} has classes {task.classes}")
        task.binarize = int(binarize)
    if test_manifest is not None:
        attach_test_manifest(task, test_manifest)
    set_intensity(task, window, percentiles, channel)
    return task


def attach_test_manifest(task: SegTask, path: str | Path) -> None:
    """Use every row of a CSV manifest as ``task``'s separate test set (same classes)."""
    test = read_seg_csv(path, classes=task.classes, label_map=task.label_map)
    if test.spatial_dims != task.spatial_dims:
        raise ValueError(f"{path}: {test.spatial_dims}D test images for a {task.spatial_dims}D task")
    task.test_cases = test.cases + test.test_cases


def set_intensity(task: SegTask, window: tuple[float, float] | None = None,
                  percentiles: tuple[float, float] | None = None, channel: int | None = None) -> None:
    """3D intensity options: ``window`` (e.g. (-150, 250) HU for CT), else clipping each volume to
    its ``percentiles``; ``channel`` of 4D multi-modal images. Errors say what is wrong."""
    if task.spatial_dims != 3 and (window or percentiles or channel is not None):
        raise ValueError("--window, --percentiles and --channel apply to 3D volumes only")
    for name, pair in (("--window", window), ("--percentiles", percentiles)):
        if pair is not None and not pair[0] < pair[1]:
            raise ValueError(f"{name} needs LO < HI, got {list(pair)}")
    if percentiles is not None:
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"--percentiles must lie in [0, 100], got {list(percentiles)}")
        task.percentiles = tuple(percentiles)
        task.intensity_range = tuple(window) if window is not None else None  # percentiles asked for: no window unless given
    elif window is not None:
        task.intensity_range = tuple(window)
    if channel is not None:
        if channel < 0:
            raise ValueError(f"--channel must be >= 0, got {channel}")
        task.channel = channel


def _source_task(source: str, path: str | Path, organs, patients, test_patients, classes) -> SegTask:
    path = Path(path)
    if source == "auto":
        if path.is_file() and path.suffix.lower() == ".csv":
            source = "csv"
        elif (path / "5-fold-cv.csv").is_file():
            source = "busbra"
        elif (path / "index.json").is_file():
            source = "openkbp"
        else:
            raise ValueError(
                f"cannot tell what {path} is: give a CSV manifest (image, mask, patient_id), a BUS-BRA"
                " folder (5-fold-cv.csv) or an OpenKBP folder (index.json), or set --seg-source"
            )
    if source == "busbra":
        return busbra_task(path)
    if source == "openkbp":
        if not organs:
            raise ValueError("an OpenKBP task needs organs (e.g. --organs Larynx,Esophagus)")
        return openkbp_task(path, organs, patients=patients, test_patients=test_patients)
    if source == "csv":
        return read_seg_csv(path, classes=classes)
    raise ValueError(f"unknown segmentation source {source!r}; choose auto, busbra, openkbp or csv")
