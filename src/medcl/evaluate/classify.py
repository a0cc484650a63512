"""Classification fine-tuning and evaluation on ingested frame sets (USCL's evaluation protocol).

Reference: Chen et al., "USCL: Pretraining Deep Ultrasound Image Diagnosis Model through Video
Contrastive Representation Learning", MICCAI 2021, section 3 (POCUS, 5-fold CV by patient, only
the last residual stage + a new linear head fine-tuned, lr 0.01).

Differences from the authors' public code, on purpose:
- the model is selected on a validation part carved from the TRAINING folds (grouped by patient),
  never on the test fold; the test fold is evaluated once, with the selected model;
- folds are stratified AND grouped by patient, and repeated with different seeds;
- frozen parts of the backbone run in eval mode (their BatchNorm statistics stay fixed), which is
  also what makes it valid to compute their output once and reuse it (the feature cache).

This module is the classification *task adapter* on the one fine-tuning protocol
(:mod:`medcl.evaluate.protocol`: splits, training loop with validation-based selection, run
folder, comparison of inits): it owns the data (frames of labeled videos), the head
(:class:`FrameClassifier`, defined with the other fine-tuned networks in
:mod:`medcl.evaluate.models`), the loss (cross-entropy) and the metrics (frame and video level).
Inputs follow :mod:`medcl.inputs`; initialisations are read by :mod:`medcl.weights`.

Flow: ``load_frame_data`` (filter, map labels, resize) -> ``make_folds`` -> for each
initialisation ``run_classification`` (one run folder, each fold's selected model kept in its
``models/``; ``final_model`` adds one trained on all labeled videos) -> paired comparison
(patient bootstrap).

>>> from medcl.evaluate.classify import FinetuneConfig, finetune   # doctest: +SKIP
>>> finetune("ingested/", inits=["scratch", "runs/uscl/checkpoints/final.pt"],
...          config=FinetuneConfig(protocol="last_stage"), out="runs/ft")   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from medcl.data.frames import FrameSets
from medcl.data.manifest import VideoRecord, read_manifest
from medcl.data.splits import Fold, fixed_split_with_validation, repeated_group_kfold, select_label_fraction
from medcl.evaluate.metrics import SUMMARY_KEYS, classification_metrics, fmt, summarize, video_level
from medcl.evaluate.models import (
    FINAL_MODEL,
    FRAME_CLASSIFIER,
    FeatureStandardizer,
    FrameClassifier,
    Protocol,
    base_card,
    classifier_parts,
    file_sha256,
    finish_models,
    models_folder,
    save_finetuned,
    split_backbone,  # noqa: F401 (defined with the network in evaluate.models; imported from here too)
    with_intervals,
)
from medcl.evaluate.protocol import RunResult, Schedule, Validation, compare_inits, train_with_selection, write_run
from medcl.inputs import InputSpec, resize_frames, to_model_input
from medcl.models.backbones import RESNET18_FEATURES, resnet18_backbone
from medcl.precision import autocast, channels_last, make_optimizer, resolve_precision
from medcl.sampling.augment import AugmentParams, augment_frames
from medcl.weights import InitSpec, LoadedBackbone, load_init

# Inputs follow medcl.inputs, exactly what pretraining fed the backbone: frozen BatchNorm
# statistics are only valid for that input convention.

class FinetuneConfig(BaseModel):
    """Everything that defines a fine-tuning run (written to ``config.yaml`` in the run folder)."""

    model_config = ConfigDict(extra="forbid")

    protocol: Protocol = "last_stage"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    image_size: int = Field(112, ge=16)
    folds: int = Field(5, ge=2)
    repeats: int = Field(3, ge=1)
    seed: int = 0
    val_fraction: float = Field(0.2, gt=0, lt=1)
    patience: int = Field(10, ge=1, description="epochs without validation improvement before stopping")
    select_metric: Literal["loss", "accuracy", "balanced_accuracy", "macro_f1"] = "loss"
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of each fold's training patients whose labels are used")
    augment: bool = False
    feature_cache: bool = Field(True, description="reuse frozen-prefix outputs when augment is off")
    max_train_frames_per_video: int = Field(0, ge=0, description="0 = every kept frame")
    # data selection
    classes: list[str] | None = None
    label_map: dict[str, str] = Field(default_factory=dict)
    videos_file: str | None = None
    source_contains: str | None = None
    metadata: str | None = None
    where: dict[str, str] = Field(default_factory=dict)
    device: str = "cpu"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast where the CPU / GPU does bf16 natively (auto), always (bf16) or never")
    channels_last: bool = Field(True, description="channels_last memory format for the CNN (same values, faster)")
    allow_outside_frames: bool = Field(False, description="follow manifest frame paths outside the manifest's folder")
    # what the run keeps (RUN/models/, see medcl.evaluate.models)
    save_models: bool = Field(True, description="keep each fold's selected model in RUN/models/ (with a model card)")
    final_model: bool = Field(False, description="also train one model on all labeled videos for the median selected "
                                                 "epoch over folds: RUN/models/final.safetensors")
    tensorboard: bool = Field(False, description="also write the curves as TensorBoard scalars under RUN/tb")


# --------------------------------------------------------------------------------------------
# data


@dataclass
class FrameData:
    """Labeled frames of the selected videos, resized once, kept as uint8 [N, 1, S, S]."""

    classes: list[str]
    video_ids: list[str]
    video_labels: np.ndarray  # int [V]
    video_patients: list[str]
    frames: torch.Tensor  # uint8 [N, 1, S, S]
    frame_video: np.ndarray  # int [N] index into videos
    frame_index: np.ndarray  # int [N] index of the frame inside its video
    manifests: list[str] = field(default_factory=list)  # the manifest file(s) the videos come from

    @property
    def frame_labels(self) -> np.ndarray:
        return self.video_labels[self.frame_video]

    def frames_of(self, videos: np.ndarray, max_per_video: int = 0) -> np.ndarray:
        """Frame indices of the given videos (at most ``max_per_video`` evenly spread ones)."""
        wanted = np.zeros(len(self.video_ids), dtype=bool)
        wanted[np.asarray(videos, dtype=int)] = True
        idx = np.flatnonzero(wanted[self.frame_video])
        if max_per_video <= 0:
            return idx
        keep = []
        for v in np.asarray(videos, dtype=int):
            own = idx[self.frame_video[idx] == v]
            if len(own) > max_per_video:
                own = own[np.linspace(0, len(own) - 1, max_per_video).round().astype(int)]
            keep.append(own)
        return np.sort(np.concatenate(keep)) if keep else idx[:0]

    def inputs(self, idx: np.ndarray, spec: InputSpec) -> torch.Tensor:
        """Model inputs of frames ``idx`` under the input convention ``spec`` (no augmentation)."""
        return to_model_input(self.frames[torch.as_tensor(idx, dtype=torch.long)], spec)

    @staticmethod
    def concat(a: FrameData, b: FrameData) -> FrameData:
        if a.classes != b.classes or a.frames.shape[1:] != b.frames.shape[1:]:
            raise ValueError(f"cannot join frame data with classes {a.classes} / {b.classes}")
        return FrameData(
            a.classes,
            a.video_ids + b.video_ids,
            np.concatenate([a.video_labels, b.video_labels]),
            a.video_patients + b.video_patients,
            torch.cat([a.frames, b.frames]),
            np.concatenate([a.frame_video, b.frame_video + len(a.video_ids)]),
            np.concatenate([a.frame_index, b.frame_index]),
            a.manifests + b.manifests,
        )


def _read_metadata(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if "file" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: metadata needs a 'file' column (source path); found {reader.fieldnames}")
        return {row["file"].replace("\\", "/"): row for row in reader}


def _metadata_row(metadata: dict[str, dict[str, str]], source: str) -> dict[str, str] | None:
    """The row whose ``file`` is the record's source path; else the one row with its file name."""
    source = source.replace("\\", "/")
    if source in metadata:
        return metadata[source]
    name = source.rsplit("/", 1)[-1]
    rows = [row for file, row in metadata.items() if file.rsplit("/", 1)[-1] == name]
    return rows[0] if len(rows) == 1 else None


def select_records(records: list[VideoRecord], config: FinetuneConfig, where_from: str = "") -> list[VideoRecord]:
    """Apply the label map, class filter, video-id list, source filter and metadata filter.

    Unlabeled videos are always dropped. ``where`` (e.g. ``{"probe": "convex"}``) is matched
    against the metadata CSV row whose ``file`` equals the record's ``source`` (or, failing that,
    the only row with the same file name).
    """
    out = []
    allowed_ids = None
    if config.videos_file:
        path = Path(config.videos_file)
        if not path.is_file():
            raise FileNotFoundError(f"video list not found: {path}")
        allowed_ids = {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    if config.classes is not None:
        check_classes(records, config, where_from)
    metadata = _read_metadata(Path(config.metadata)) if config.metadata else None
    if config.where and metadata is None:
        raise ValueError(f"where={config.where} needs a metadata CSV (--metadata)")
    for record in records:
        label = config.label_map.get(record.label, record.label)
        if not label:
            continue
        if config.classes is not None and label not in config.classes:
            continue
        if allowed_ids is not None and record.video_id not in allowed_ids:
            continue
        if config.source_contains and config.source_contains not in record.source:
            continue
        if metadata is not None and config.where:
            row = _metadata_row(metadata, record.source)
            if row is None:
                continue
            missing = [k for k in config.where if k not in row]
            if missing:
                raise ValueError(f"{config.metadata}: no column(s) {missing} (filter {config.where})")
            if any(row[k] != v for k, v in config.where.items()):
                continue
        record = copy.copy(record)
        record.label = label
        out.append(record)
    if not out:
        raise ValueError(f"no labeled videos left in {where_from or 'the manifest'} after filtering "
                         f"(classes={config.classes}, label_map={config.label_map}, where={config.where})")
    return out


def check_classes(records: list[VideoRecord], config: FinetuneConfig, where_from: str) -> None:
    """``config.classes`` must name distinct classes that occur in the data (after the label map):
    a typo would otherwise train a head with a phantom class."""
    found = sorted({config.label_map.get(r.label, r.label) for r in records} - {""})
    repeated = sorted({c for c in config.classes if config.classes.count(c) > 1})
    if repeated:
        raise ValueError(f"--classes names {repeated} more than once")
    missing = [c for c in config.classes if c not in found]
    if missing:
        raise ValueError(f"{where_from or 'the manifest'}: no labeled videos of class(es) {missing}; classes found: "
                         f"{', '.join(found) or 'none (no labeled video)'}" + (" (after --map)" if config.label_map else ""))


def warn_if_no_patients(patients: list[str], video_ids: list[str], where_from: str) -> bool:
    """Warn (and return True) when every patient id equals its video id: nothing groups a patient's
    videos, so videos of one patient can land in different folds."""
    if len(video_ids) < 2 or any(p != v for p, v in zip(patients, video_ids)):
        return False
    warnings.warn(f"{where_from}: every patient_id equals its video_id, so no patient grouping is known: videos of "
                  "one patient can land in different folds (train on one exam, test on another of the same patient). "
                  "Give patient ids at ingest (--metadata / --patient-pattern; DICOM PatientID is read automatically).",
                  UserWarning, stacklevel=3)
    return True


def load_frame_data(
    source: str | Path | FrameSets, config: FinetuneConfig, classes: list[str] | None = None
) -> FrameData:
    """Select videos from an ingest folder / manifest and load their frames resized to
    ``config.image_size``. ``classes`` fixes the class order (else config.classes or sorted labels);
    when it is given (a separate test set), ``config.classes`` need not all occur in this data."""
    sets = source if isinstance(source, FrameSets) else FrameSets(
        source, cache=False, allow_outside=config.allow_outside_frames)  # resized copies are kept
    checked = config if classes is None else config.model_copy(update={"classes": None})
    records = select_records(sets.records, checked, where_from=str(sets.manifest_path))
    if classes is not None and config.classes is not None:
        records = [r for r in records if r.label in config.classes]
    present = sorted({r.label for r in records})
    classes = list(classes or config.classes or present)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ValueError(f"{sets.manifest_path}: labels {unknown} are not in classes {classes}")
    size = config.image_size
    frames, frame_video, frame_index, kept = [], [], [], []
    for record in records:
        arr = sets.load_frames(record)
        if len(arr) == 0:  # nothing to train or test on; it must not occupy a place in the folds
            continue
        v = len(kept)
        kept.append(record)
        frames.append(resize_frames(torch.from_numpy(np.ascontiguousarray(arr)), size))
        frame_video.append(np.full(len(arr), v))
        frame_index.append(np.arange(len(arr)))
    if not frames:
        raise ValueError(f"{sets.manifest_path}: the selected videos hold no frames")
    warn_if_no_patients([r.patient_id or r.video_id for r in kept], [r.video_id for r in kept], str(sets.manifest_path))
    return FrameData(
        classes=classes,
        video_ids=[r.video_id for r in kept],
        video_labels=np.array([classes.index(r.label) for r in kept], dtype=np.int64),
        video_patients=[r.patient_id or r.video_id for r in kept],
        frames=torch.cat(frames),
        frame_video=np.concatenate(frame_video),
        frame_index=np.concatenate(frame_index),
        manifests=[str(sets.manifest_path)],
    )


# Fine-tuning augmentation: milder crops than contrastive pretraining (the label must survive).
FINETUNE_AUGMENT = AugmentParams(crop_scale=(0.8, 1.0), rotate_degrees=10.0, brightness=0.1, contrast=0.1)


# --------------------------------------------------------------------------------------------
# initialisation and model parts


def init_backbone(init: InitSpec, seed: int = 0) -> LoadedBackbone:
    """The backbone of ``init`` (:func:`medcl.weights.load_init`); scratch is a ResNet-18 drawn with ``seed``."""
    loaded = load_init(init)
    if loaded.network is None:
        torch.manual_seed(seed)
        loaded.network = resnet18_backbone(in_channels=1)
        loaded.architecture, loaded.kwargs = "resnet18", {"in_channels": 1}
    return loaded


def build_classifier(backbone: nn.Module, protocol: Protocol, n_classes: int, head_seed: int) -> FrameClassifier:
    prefix, suffix = classifier_parts(copy.deepcopy(backbone), protocol)
    torch.manual_seed(head_seed)
    return FrameClassifier(prefix, suffix, RESNET18_FEATURES, n_classes)


# --------------------------------------------------------------------------------------------
# training one fold


class InputSource:
    """What the trainable part sees for a set of frame indices: either the frozen prefix's cached
    outputs (computed once), or prefix(input(frames)) computed on the fly. ``spec``: the input
    convention (an int is medcl's own convention with that many channels)."""

    def __init__(self, data: FrameData, model: FrameClassifier, spec: InputSpec | int, augment: bool,
                 cache: torch.Tensor | None, device: torch.device, seed: int = 0,
                 dtype: torch.dtype | None = None, memory_format: bool = False):
        self.data, self.model, self.spec = data, model, _as_spec(spec)
        self.augment, self.cache, self.device = augment, cache, device
        self.rng = np.random.default_rng(seed)
        # medcl.precision: autocast dtype (None = fp32) and channels_last inputs for the CNN
        self.dtype, self.memory_format = dtype, memory_format

    def compute(self):
        """The autocast context of every forward pass of this source's model."""
        return autocast(self.device, self.dtype)

    def get(self, idx: np.ndarray, train: bool) -> torch.Tensor:
        t = torch.as_tensor(idx, dtype=torch.long)
        if self.cache is not None:
            return self.cache[t].to(self.device)
        if train and self.augment:
            x = self.spec.normalize(augment_frames(self.data.frames[t, 0], self.data.frames.shape[-1], self.rng,
                                                   FINETUNE_AUGMENT))
        else:
            x = self.data.inputs(idx, self.spec)
        x = x.to(self.device)
        if self.memory_format:
            x = channels_last(x)
        with torch.no_grad(), self.compute():
            return self.model.prefix(x)


def _as_spec(spec: InputSpec | int) -> InputSpec:
    return spec if isinstance(spec, InputSpec) else InputSpec(in_channels=int(spec))


def compute_feature_cache(prefix: nn.Module, data: FrameData, spec: InputSpec | int, device: torch.device,
                          batch_size: int = 128, dtype: torch.dtype | None = None,
                          memory_format: bool = False) -> torch.Tensor:
    """Outputs of the frozen prefix (eval mode) for every frame, float32 on CPU (computed under
    ``dtype`` autocast, channels_last when ``memory_format``: as the plain path computes them)."""
    prefix = prefix.to(device).eval()
    if memory_format:
        channels_last(prefix)
    spec = _as_spec(spec)
    outs = []
    with torch.no_grad(), autocast(device, dtype):
        for start in range(0, len(data.frames), batch_size):
            x = data.inputs(np.arange(start, min(start + batch_size, len(data.frames))), spec).to(device)
            outs.append(prefix(channels_last(x) if memory_format else x).float().cpu())
    return torch.cat(outs)


def predict(model: FrameClassifier, source: InputSource, idx: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities [len(idx), C] in eval mode."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            h = source.get(idx[start:start + batch_size], train=False)
            with source.compute():
                logits = model.forward_features(h)
            out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.out_features))


def _val_score(y: np.ndarray, probs: np.ndarray, classes: list[str], metric: str) -> tuple[float, float]:
    """(score where higher is better, validation loss)."""
    eps = 1e-12
    loss = float(-np.log(probs[np.arange(len(y)), y] + eps).mean())
    if metric == "loss":
        return -loss, loss
    return float(classification_metrics(y, probs, classes)[metric]), loss


def train_fold(model: FrameClassifier, source: InputSource, fit_idx: np.ndarray, val_idx: np.ndarray,
               config: FinetuneConfig, seed: int, classes: list[str],
               epochs: int | None = None) -> tuple[dict, list[dict]]:
    """Train the suffix + head on ``fit_idx`` frames with the protocol's loop (an epoch per
    period, early stopping on the validation frames); returns (summary, curve). The model holds
    the selected weights afterwards. With ``epochs`` (the final model): exactly that many epochs
    of the same learning-rate schedule, no validation, the last weights kept."""
    if isinstance(model.suffix, FeatureStandardizer):  # statistics of this fold's training frames only
        model.suffix.fit(torch.cat([source.get(fit_idx[i:i + 256], train=False) for i in range(0, len(fit_idx), 256)]))
    generator = torch.Generator().manual_seed(seed)
    params = model.trainable_parameters()
    extra = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    opt = make_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay, **extra)
    steps_per_epoch = max(1, math.ceil(len(fit_idx) / config.batch_size))
    labels = torch.as_tensor(source.data.frame_labels)
    y_val = source.data.frame_labels[val_idx]

    def epoch_batches(epoch: int):
        perm = fit_idx[torch.randperm(len(fit_idx), generator=generator).numpy()]
        for start in range(0, len(perm), config.batch_size):
            batch = perm[start:start + config.batch_size]
            if len(batch) < 2 and start:  # a 1-sample BatchNorm batch is undefined; skip the remainder
                continue
            yield batch

    def step_loss(batch: np.ndarray) -> tuple[torch.Tensor, int]:
        h = source.get(batch, train=True)
        with source.compute():
            logits = model.forward_features(h)
        return F.cross_entropy(logits.float(), labels[torch.as_tensor(batch)].to(h.device)), len(batch)

    def validate() -> Validation:
        if epochs is not None:
            return Validation(None, {"val_loss": float("nan"), "val_metric": float("nan")})
        score, val_loss = _val_score(y_val, predict(model, source, val_idx, config.batch_size * 2), classes,
                                     config.select_metric)
        return Validation(score, {"val_loss": val_loss, "val_metric": score if config.select_metric != "loss" else val_loss})

    schedule = Schedule(total_steps=config.epochs * steps_per_epoch, periods=epochs or config.epochs,
                        patience=config.patience)
    selection = train_with_selection(model, opt, schedule, epoch_batches, step_loss, validate, frozen_prefixes=("prefix.",))
    curve = [{"epoch": row["period"], "train_loss": row["train_loss"], "val_loss": row["val_loss"],
              "val_metric": row["val_metric"]} for row in selection.curve]
    return {"best_epoch": selection.best_period, "epochs_run": selection.periods_run,
            "best_val": selection.best_score}, curve


# --------------------------------------------------------------------------------------------
# one initialisation over all folds


def make_folds(data: FrameData, config: FinetuneConfig) -> list[Fold]:
    """Repeated stratified group k-fold on the videos (deterministic in data + seed); with a
    label fraction below 1, each fold's training videos are cut to that share of its patients."""
    folds = repeated_group_kfold(data.video_ids, data.video_labels, data.video_patients,
                                 config.folds, config.repeats, config.seed, config.val_fraction)
    return [_label_fraction(data, f, config) for f in folds]


def _label_fraction(data: FrameData, fold: Fold, config: FinetuneConfig) -> Fold:
    if config.label_fraction >= 1.0:
        return fold
    patients = [data.video_patients[v] for v in fold.train]
    keep = select_label_fraction(patients, config.label_fraction, seed=config.seed * 1000 + fold.repeat * 101 + fold.fold)
    return Fold(fold.repeat, fold.fold, fold.train[np.asarray(keep, dtype=int)], fold.val, fold.test)


def use_feature_cache(config: FinetuneConfig) -> bool:
    return config.feature_cache and not config.augment and config.protocol in ("linear", "last_stage")


def compute_settings(config: FinetuneConfig) -> tuple[torch.device, torch.dtype | None, bool]:
    """(device, autocast dtype or None, channels_last) of a fine-tuning run (:mod:`medcl.precision`)."""
    device = torch.device(config.device)
    return device, resolve_precision(config.precision, device), config.channels_last


def run_classification(data: FrameData, folds: list[Fold], init: InitSpec, config: FinetuneConfig,
                       out: str | Path | None = None, extra_config: dict | None = None,
                       log=print) -> RunResult:
    """Fine-tune from ``init`` on every fold, test each test fold once; write the run folder.

    With ``out``, ``config.save_models`` keeps each fold's selected model in ``out/models/`` and
    ``config.final_model`` adds one trained on all labeled videos (:mod:`medcl.evaluate.models`)."""
    device, dtype, memory_format = compute_settings(config)
    if init.per_fold and config.final_model:
        raise ValueError(f"initialisation {init.name!r} is per fold ({init.path}): a final model trained on every "
                         "labeled video has no single backbone to start from (drop final_model)")
    cached = use_feature_cache(config)
    timing = {"feature_cache_s": 0.0, "train_s": 0.0}
    prepared: dict[str | None, tuple[LoadedBackbone, Any]] = {}

    def backbone_of(fold_init: InitSpec) -> tuple[LoadedBackbone, Any]:
        """The fold's backbone and feature cache (once per distinct file: once unless per fold)."""
        if fold_init.path not in prepared:
            prepared.clear()  # per-fold inits: keep one backbone (and its cache) in memory at a time
            loaded = init_backbone(fold_init, seed=config.seed)
            cache = None
            if cached:
                t0 = time.perf_counter()
                prefix, _ = split_backbone(copy.deepcopy(loaded.network), config.protocol)
                cache = compute_feature_cache(prefix, data, loaded.input, device, dtype=dtype,
                                              memory_format=memory_format)
                timing["feature_cache_s"] += time.perf_counter() - t0
            prepared[fold_init.path] = (loaded, cache)
        return prepared[fold_init.path]

    loaded, cache = backbone_of(init.for_fold(folds[0].repeat, folds[0].fold))
    spec = loaded.input
    classes = data.classes
    models_dir = models_folder(out, config.save_models or config.final_model)
    card = classification_card(data, init, loaded, config) if models_dir is not None else {}
    kept: list[dict] = []
    fold_results, predictions, curves = [], [], []
    for fold in folds:
        loaded, cache = backbone_of(init.for_fold(fold.repeat, fold.fold))
        backbone, spec = loaded.network, loaded.input
        t0 = time.perf_counter()
        head_seed = config.seed * 100003 + fold.repeat * 101 + fold.fold
        model = build_classifier(backbone, config.protocol, len(classes), head_seed).to(device)
        if memory_format:
            channels_last(model)
        source = InputSource(data, model, spec, config.augment, cache, device, seed=head_seed, dtype=dtype,
                             memory_format=memory_format)
        fit_idx = data.frames_of(fold.train, config.max_train_frames_per_video)
        val_idx, test_idx = data.frames_of(fold.val), data.frames_of(fold.test)
        summary, curve = train_fold(model, source, fit_idx, val_idx, config, head_seed, classes)
        probs = predict(model, source, test_idx, config.batch_size * 2)
        y = data.frame_labels[test_idx]
        frame_m = classification_metrics(y, probs, classes)
        vids = data.frame_video[test_idx]
        v_order, v_y, v_probs = video_level(vids, y, probs)
        video_m = classification_metrics(v_y, v_probs, classes)
        timing["train_s"] += time.perf_counter() - t0
        fold_results.append({
            "repeat": fold.repeat, "fold": fold.fold,
            "n_train_videos": int(len(fold.train)), "n_val_videos": int(len(fold.val)),
            "n_test_videos": int(len(fold.test)), "n_train_frames": int(len(fit_idx)),
            **summary, "frame": frame_m, "video": video_m,
        })
        for c in curve:
            curves.append({"repeat": fold.repeat, "fold": fold.fold, **c})
        for i, frame_no in enumerate(test_idx):
            predictions.append(_prediction_row(fold, data, int(data.frame_video[frame_no]),
                                               int(data.frame_index[frame_no]), int(y[i]), probs[i]))
        for v, label, p in zip(v_order, v_y, v_probs):
            predictions.append(_prediction_row(fold, data, int(v), -1, int(label), p))
        if models_dir is not None and config.save_models:
            kept.append(_keep_fold_model(model, models_dir, card, fold, summary, frame_m, video_m, loaded, config))
        log(f"[{init.name}] repeat {fold.repeat} fold {fold.fold}: best epoch {summary['best_epoch']}, "
            f"test acc frame {frame_m['accuracy']:.3f} video {video_m['accuracy']:.3f}")
    results = {
        "format": "medcl-classification-v1",
        "init": init.to_dict(),
        "input": spec.to_dict(),
        "protocol": config.protocol,
        "classes": classes,
        "feature_cache": cached,
        "timing": timing,
        "folds": fold_results,
        "summary": {
            level: summarize([f[level] for f in fold_results]) for level in ("frame", "video")
        },
    }
    if models_dir is not None:
        card["cross_validation"] = results["summary"]
        if config.final_model:
            t0 = time.perf_counter()
            kept.append(train_final_model(data, folds, fold_results, loaded, cache, card, models_dir, config))
            timing["final_model_s"] = time.perf_counter() - t0
            log(f"[{init.name}] {kept[-1]['selection']}")
        finish_models(models_dir, card, kept, lambda entry: results["summary"])
    result = RunResult(init.name, Path(out) if out else None, results, predictions)
    if out is not None:
        run_config = {"task": "classify", **config.model_dump(), **(extra_config or {}), "init": init.to_dict(),
                      "input": spec.to_dict()}
        write_run(out, run_config, results, curves, predictions, results_markdown(results),
                  tensorboard=("epoch", ("repeat", "fold")) if config.tensorboard else None)
    return result


# --------------------------------------------------------------------------------------------
# the models a run keeps (RUN/models/, medcl.evaluate.models)


def ingest_settings(manifest: str | Path | None) -> dict[str, Any]:
    """How the training frames were made (``ingest.json`` beside the manifest), so that new videos
    are decoded the same way; without that file: 3 fps, sector crop, the frames' stored size."""
    from medcl.ingest.store import SETTINGS_NAME

    if manifest is None:
        return {"fps": 3.0, "size": None, "crop": True, "source": "assumed (no manifest)"}
    path = Path(manifest).parent / SETTINGS_NAME
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        sizes = {max(r.width, r.height) for r in read_manifest(manifest) if r.width}
        return {"fps": 3.0, "size": sizes.pop() if len(sizes) == 1 else None, "crop": True,
                "source": f"assumed (no readable {SETTINGS_NAME} beside {manifest})"}
    return {"fps": settings.get("fps", 3.0), "size": settings.get("size"), "crop": settings.get("crop", True),
            "source": str(path)}


def classification_card(data: FrameData, init: InitSpec, loaded: LoadedBackbone, config: FinetuneConfig) -> dict:
    """The card fields every model of a classification run shares (see :mod:`medcl.evaluate.models`)."""
    size, spec = config.image_size, loaded.input
    inputs = {
        "kind": "2D grayscale ultrasound frames: videos, DICOM cine, still images or an ingest folder",
        "spatial_dims": 2,
        "ingest": ingest_settings(data.manifests[0] if data.manifests else None),
        "image_size": size,
        "normalization": spec.to_dict(),
        "description": f"frames as ingest makes them, resized to {size} x {size} (medcl.inputs), then {spec.describe()}",
    }
    selection = (f"Each fold's model is the epoch with the best validation {config.select_metric} on patients carved "
                 f"from that fold's training folds (at most {config.epochs} epochs, early stop after {config.patience} "
                 "without improvement), then tested once on the fold's held-out patients.")
    manifests = [{"path": m, "sha256": file_sha256(m)} for m in data.manifests if Path(m).is_file()]
    return base_card("classify", data.classes, inputs,
                     {**init.to_dict(), "architecture": loaded.architecture, "source": loaded.source}, selection,
                     {"manifests": manifests, "videos": len(data.video_ids), "frames": int(len(data.frames)),
                      "patients": len(set(data.video_patients))},
                     protocol=config.protocol,
                     prediction="class probabilities per frame (softmax); a video's are the mean of its frames'")


def _classifier_kwargs(loaded: LoadedBackbone, config: FinetuneConfig, n_classes: int) -> dict:
    return {"backbone": loaded.architecture, "protocol": config.protocol, "n_classes": n_classes, **loaded.kwargs}


def _keep_fold_model(model: FrameClassifier, folder: Path, card: dict, fold: Fold, summary: dict, frame_m: dict,
                     video_m: dict, loaded: LoadedBackbone, config: FinetuneConfig) -> dict:
    entry = {"file": f"repeat{fold.repeat}_fold{fold.fold}.safetensors", "repeat": fold.repeat, "fold": fold.fold,
             "best_epoch": summary["best_epoch"],
             "selection": f"repeat {fold.repeat} fold {fold.fold}: epoch {summary['best_epoch'] + 1} of "
                          f"{summary['epochs_run']} run",
             "test": f"video accuracy {video_m['accuracy']:.3f}, macro-F1 {video_m['macro_f1']:.3f} "
                     f"({video_m['n']} held-out videos)"}
    own = {level: {k: m[k] for k in SUMMARY_KEYS} for level, m in (("frame", frame_m), ("video", video_m))}
    save_finetuned(model, folder / entry["file"], FRAME_CLASSIFIER, _classifier_kwargs(loaded, config, len(card["classes"])),
                   {**card, "model": {**entry, "test_metrics": own}}, loaded.input)
    return entry


def train_final_model(data: FrameData, folds: list[Fold], fold_results: list[dict], loaded: LoadedBackbone,
                      cache: torch.Tensor | None, card: dict, folder: Path, config: FinetuneConfig) -> dict:
    """Train one model on every video the folds trained or validated on (every labeled video in
    cross-validation; the training set with a fixed test set) for the median selected epoch over
    the folds, with the folds' schedule; save it as ``folder/final.safetensors``. Its draws of
    random numbers are its own: the caller's generators are left as they were."""
    selected = [int(r["best_epoch"]) + 1 for r in fold_results]
    epochs = max(1, int(np.median(selected) + 0.5))
    videos = np.unique(np.concatenate([np.concatenate([f.train, f.val]) for f in folds]))
    seed = config.seed * 100003 + 99991
    device, dtype, memory_format = compute_settings(config)
    with torch.random.fork_rng(devices=[]):
        model = build_classifier(loaded.network, config.protocol, len(data.classes), seed).to(device)
        if memory_format:
            channels_last(model)
        source = InputSource(data, model, loaded.input, config.augment, cache, device, seed=seed, dtype=dtype,
                             memory_format=memory_format)
        fit_idx = data.frames_of(videos, config.max_train_frames_per_video)
        train_fold(model, source, fit_idx, fit_idx[:0], config, seed, data.classes, epochs=epochs)
    entry = {"file": FINAL_MODEL, "final": True, "epochs": epochs, "fold_selected_epochs": selected,
             "n_videos": int(len(videos)), "n_frames": int(len(fit_idx)),
             "selection": f"final model: {epochs} epoch(s), the median over the folds of the selected epoch "
                          f"({', '.join(map(str, selected))}), on all {len(videos)} labeled training videos",
             "test": "none of its own: the cross-validation above estimates models trained this way"}
    save_finetuned(model, folder / FINAL_MODEL, FRAME_CLASSIFIER, _classifier_kwargs(loaded, config, len(data.classes)),
                   {**card, "cross_validation": with_intervals(card["cross_validation"]), "model": entry}, loaded.input)
    return entry


def _prediction_row(fold: Fold, data: FrameData, video: int, frame: int, label: int, probs) -> dict:
    row = {"repeat": fold.repeat, "fold": fold.fold, "video_id": data.video_ids[video],
           "patient_id": data.video_patients[video], "frame": frame,
           "true": data.classes[label], "pred": data.classes[int(np.argmax(probs))]}
    for c, p in zip(data.classes, probs):
        row[f"prob_{c}"] = float(p)
    return row


def results_markdown(results: dict) -> str:
    """Mean ± std over folds, per-class scores and the summed confusion matrix."""
    classes = results["classes"]
    n = len(results["folds"])
    lines = [f"# Classification: {results['init']['name']} ({results['protocol']})", "",
             f"{n} test fold(s); mean ± std over folds. Video level = mean of frame probabilities.", "",
             "| level | accuracy | balanced accuracy | macro-F1 | ROC-AUC (OvR) |", "|---|---|---|---|---|"]
    for level in ("frame", "video"):
        s = results["summary"][level]
        lines.append(f"| {level} | {fmt(s['accuracy'])} | {fmt(s['balanced_accuracy'])} | "
                     f"{fmt(s['macro_f1'])} | {fmt(s['roc_auc_ovr'])} |")
    for level in ("frame", "video"):
        lines += ["", f"## Per class ({level} level, mean over folds)", "",
                  "| class | precision | recall | F1 | ROC-AUC |", "|---|---|---|---|---|"]
        for c in classes:
            vals = []
            for key in ("precision", "recall", "f1", "roc_auc"):
                xs = [f[level]["per_class"][c][key] for f in results["folds"]
                      if f[level]["per_class"][c][key] is not None]
                vals.append(f"{np.mean(xs):.3f}" if xs else "n/a")
            lines.append(f"| {c} | " + " | ".join(vals) + " |")
        cm = np.sum([np.array(f[level]["confusion_matrix"]) for f in results["folds"]], axis=0)
        lines += ["", f"Confusion matrix ({level} level, summed over folds; rows = true, columns = predicted):", "",
                  "| true \\ pred | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        for c, row in zip(classes, cm):
            lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# public API


def finetune(data: str | Path, inits: list[str | InitSpec] = ("scratch",), config: FinetuneConfig | None = None,
             out: str | Path | None = None, log=print, compare_metrics=("accuracy", "macro_f1"),
             n_boot: int = 2000, overwrite: bool = False) -> dict:
    """Cross-validate every initialisation on the SAME folds; with several inits, also write a
    paired comparison (``comparison.json`` / ``.md``) against the first one.

    ``out`` is the run folder for one init, or the parent of ``out/<init name>/`` for several;
    results already there are refused unless ``overwrite``.
    Returns {"runs": {name: results}, "comparison": dict | None}.
    """
    config = config or FinetuneConfig()
    frame_data = load_frame_data(data, config)
    folds = make_folds(frame_data, config)
    log(f"{len(frame_data.video_ids)} videos, {len(frame_data.frames)} frames, classes {frame_data.classes}; "
        f"{config.folds} folds x {config.repeats} repeats, protocol {config.protocol}")
    return _run_all(frame_data, folds, inits, config, out, {"data": str(data)}, log, compare_metrics, n_boot,
                    overwrite)


def evaluate_fixed(train: str | Path, test: str | Path, inits: list[str | InitSpec] = ("scratch",),
                   config: FinetuneConfig | None = None, out: str | Path | None = None, log=print,
                   allow_overlap: bool = False, compare_metrics=("accuracy", "macro_f1"), n_boot: int = 2000,
                   overwrite: bool = False) -> dict:
    """Train on the ``train`` manifest (validation carved from it, by patient), test once on the
    separate ``test`` manifest. ``config.repeats`` repeats use different validation parts / seeds.
    Refuses videos or patients present in both (leakage) unless ``allow_overlap``."""
    config = config or FinetuneConfig()
    train_data = load_frame_data(train, config)
    test_data = load_frame_data(test, config, classes=train_data.classes)
    shared_videos = set(train_data.video_ids) & set(test_data.video_ids)
    shared_patients = set(train_data.video_patients) & set(test_data.video_patients)
    if (shared_videos or shared_patients) and not allow_overlap:
        raise ValueError(f"train {train} and test {test} share videos {sorted(shared_videos)[:5]} / patients "
                         f"{sorted(shared_patients)[:5]}: that leaks test data (allow_overlap to override)")
    n_train = len(train_data.video_ids)
    joined = FrameData.concat(train_data, test_data)
    test_videos = np.arange(n_train, len(joined.video_ids))
    folds = [_label_fraction(joined, Fold(f.repeat, 0, f.train, f.val, test_videos), config)
             for f in fixed_split_with_validation(train_data.video_ids, train_data.video_labels,
                                                  train_data.video_patients, config.repeats, config.seed,
                                                  config.val_fraction)]
    log(f"train: {n_train} videos; test: {len(test_videos)} videos; classes {joined.classes}; "
        f"{config.repeats} repeat(s), protocol {config.protocol}")
    return _run_all(joined, folds, inits, config, out, {"train": str(train), "test": str(test)}, log,
                    compare_metrics, n_boot, overwrite, command="medcl evaluate")


def _run_all(data: FrameData, folds: list[Fold], inits, config: FinetuneConfig,
             out: str | Path | None, extra: dict, log, compare_metrics, n_boot: int = 2000,
             overwrite: bool = False, command: str = "medcl finetune") -> dict:
    from medcl.evaluate.compare import compare_results, write_comparison

    def compare(runs: list[RunResult]) -> dict:
        return compare_results([r.predictions for r in runs], [r.init for r in runs],
                               metrics=compare_metrics, n_boot=n_boot, seed=config.seed)

    def check(init: InitSpec) -> None:
        """Every file an init needs loads (each fold's, for a per-fold init) before the first run starts."""
        for path in dict.fromkeys(init.for_fold(f.repeat, f.fold).path for f in folds):
            load_init(InitSpec(init.name, path))

    return compare_inits(inits, lambda init, run_out: run_classification(data, folds, init, config, run_out, extra, log),
                         compare, write_comparison, out, check=check, overwrite=overwrite, command=command)
