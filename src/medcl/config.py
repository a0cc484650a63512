"""Typed, validated configuration for pretraining runs.

A run is described by one nested mapping, usually a YAML preset (``configs/uscl.yaml``) plus
command-line overrides ``key.sub=value``::

    method: uscl            # selects the method and the method section below
    out: runs/uscl          # run folder
    # shared sections: only for the methods that use them (see "Sections per method" below)
    data:     {manifest, size, in_channels, label_fraction, label_seed, store: auto|memory|shards, shuffle_buffer,
               read_workers}
    sampling: {pairing: video|frame, mixup: paper|shared_lambda|none, alpha, beta}
    augment:  {enabled, crop_scale, crop_ratio, flip_p, rotate_degrees, brightness, contrast}
    model:    {backbone, proj_hidden, proj_dim, init}
    # every run
    optim:    {name: adam|adamw, lr, weight_decay, batch_size, epochs, warmup_epochs, max_steps, min_lr_ratio}
    train:    {seed, device, amp, precision, channels_last, checkpoint_every, snapshot_every, log_every, progress, tensorboard, sync_batchnorm}
    uscl:     {temperature, lambda_sup, label_aware}   # the section named after `method`

>>> cfg = load_config("configs/uscl.yaml", ["data.manifest=ingested/", "out=runs/a"])  # doctest: +SKIP
>>> cfg.method, cfg.params.temperature, cfg.optim.lr                                    # doctest: +SKIP
('uscl', 0.5, 0.0003)

Sections per method: every run has ``optim``, ``train`` and its method's section. The shared
sections :data:`SHARED_SECTIONS` (``data``, ``sampling``, ``augment``, ``model``) belong to the
methods whose config class lists them in ``shared_sections``: USCL, SimCLR, MoCo and supervised
pretraining (frame sets through ``medcl.sampling.pairs``) use all four; the semi-supervised
baselines FixMatch, Pi-model and Temporal Ensembling use ``data``, ``augment`` and ``model``
(labeled + unlabeled frames through ``medcl.sampling.labeled_unlabeled``, no pair sampling); MixCL
uses none (its data, views and model options are in ``mixcl:``). A run's :meth:`Config.to_dict` / ``config.yaml``
holds only its method's sections, and ``cfg.sampling`` etc. are ``None`` for a method that does
not use them. A section given for a method that does not use it is a :class:`ConfigError`, with
one exception for files written by medcl before sections became per-method (every MixCL
``config.yaml`` and checkpoint then carried USCL's default ``data`` / ``sampling`` / ``augment``
/ ``model``): a section that holds exactly those defaults is dropped with a :class:`ConfigWarning`.
The trainer ignores sections the method does not use when it compares a checkpoint's config on
``--resume``, so such old runs resume too.

Validation happens before anything is trained: unknown keys, wrong types, out-of-range values,
non-finite numbers in any section (``optim.lr=inf: must be a finite number``),
an unknown ``model.backbone`` (the names of ``medcl.models.backbones.BACKBONES``) and a missing
manifest raise :class:`ConfigError`, whose message lists every problem as ``key=value: reason``.

Adding a method (e.g. MixCL)
----------------------------
1. Define ``class MixCLConfig(MethodConfig)`` with its fields (pydantic, ``extra="forbid"`` is
   inherited). A method that trains on USCL frame sets derives from :class:`FrameSetMethodConfig`
   instead (shared sections data, sampling, augment, model; ``data.manifest`` required); otherwise
   list the shared sections it reads in ``shared_sections: ClassVar[tuple[str, ...]]`` (default:
   none). It may live here or in its own module.
2. Register it: add ``"mixcl": MixCLConfig`` (or the lazy string ``"medcl.methods.mixcl:MixCLConfig"``)
   to :data:`METHOD_CONFIGS`, or call ``register_method_config("mixcl", MixCLConfig)``.
3. Its section is then the top-level key ``mixcl:`` and is available as ``cfg.params``;
   ``cfg.to_dict()`` writes it back under ``mixcl``. Sections of other methods are rejected.
4. Register the builder in ``medcl.methods.base.METHOD_MODULES`` (see there).
A method that needs extra data options should put them in its own section (``mixcl.datasets``)
rather than widening the shared ``data`` section.
"""

from __future__ import annotations

import copy
import importlib
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """Invalid configuration; the message names each offending key and value."""


class ConfigWarning(UserWarning):
    """A configuration that loads but should be edited (e.g. a section dropped as unused)."""


class Section(BaseModel):
    """Base of every configuration section: unknown keys are errors, and no number anywhere may be
    NaN or infinite (``optim.lr=.inf`` would otherwise pass ``gt=0`` and train to NaN)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _finite_extra_values(self) -> Section:
        """Sections that accept free-form keys (``extra="allow"``) hold only finite numbers too."""
        for key, value in (self.model_extra or {}).items():
            if not _all_finite(value):
                raise ValueError(f"{key}={value}: must be a finite number")
        return self


class DataConfig(Section):
    manifest: Path | None = None  # ingest output folder or its manifest.csv
    size: int = Field(224, ge=8)  # model input size (pixels, square)
    in_channels: int = Field(1, ge=1)  # grayscale frames are repeated when > 1
    label_fraction: float = Field(0.01, gt=0.0, le=1.0)  # fraction of labeled videos kept, per class
    label_seed: int = 0
    # where frame-set methods (USCL, SimCLR, MoCo, supervised) read frames: `memory` packs every frame
    # into RAM (small corpora); `shards` streams WebDataset shards (medcl.sampling.streamed; made by
    # `medcl ingest --shards` or `medcl ingest shard`); `auto`: shards when the ingest folder has a shard
    # index (OUT/shards/index.json), memory otherwise. The semi-supervised methods always read into memory.
    store: Literal["auto", "memory", "shards"] = "auto"
    shuffle_buffer: int = Field(256, ge=1)  # data.store=shards: whole videos held per process (the memory bound)
    # data.store=shards: threads that read the buffer's newcomers while the model computes (0 = read in line;
    # worth it when shards sit on network storage or the step is fast, e.g. on a GPU)
    read_workers: int = Field(0, ge=0)

    @field_validator("manifest")
    @classmethod
    def _manifest_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        value = Path(value).expanduser()
        target = value / "manifest.csv" if value.is_dir() else value
        if not target.is_file():
            raise ValueError(f"manifest not found: {target}")
        return value


class SamplingConfig(Section):
    """USCL sample pair generation (see medcl.sampling.pairs)."""

    pairing: Literal["video", "frame"] = "video"
    mixup: Literal["paper", "shared_lambda", "none"] = "paper"
    alpha: float = Field(0.5, gt=0.0)
    beta: float = Field(0.5, gt=0.0)


class AugmentConfig(Section):
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip_p: float = Field(0.5, ge=0.0, le=1.0)
    rotate_degrees: float = Field(10.0, ge=0.0, le=180.0)
    brightness: float = Field(0.2, ge=0.0, lt=1.0)
    contrast: float = Field(0.2, ge=0.0, lt=1.0)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high:
            raise ValueError(f"expected 0 < low <= high, got {list(value)}")
        return value

    @field_validator("crop_scale")
    @classmethod
    def _scale_at_most_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] > 1.0:
            raise ValueError(f"crop area fraction must be <= 1, got {list(value)}")
        return value


class ModelConfig(Section):
    backbone: str = "resnet18"  # a name of medcl.models.backbones.BACKBONES
    proj_hidden: int = Field(512, ge=1)
    proj_dim: int = Field(256, ge=1)
    # start the backbone from these weights instead of a random draw (a medcl checkpoint, run folder or
    # export, or a torchvision / timm resnet18 state dict: anything `--init` accepts); heads start random
    init: str | None = None

    @field_validator("init")
    @classmethod
    def _init_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).exists():
            raise ValueError(f"file or folder not found: {value}")
        return value

    @field_validator("backbone")
    @classmethod
    def _registered_backbone(cls, value: str) -> str:
        from medcl.models.backbones import BACKBONES  # lazily: the registry imports torch and MONAI

        if value not in BACKBONES:
            raise ValueError(f"unknown backbone; known: {', '.join(sorted(BACKBONES))} "
                             "(medcl.models.backbones.register_backbone adds one)")
        return value


class OptimConfig(Section):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(32, ge=2)  # global: videos (or frames) per step over all processes
    epochs: int = Field(300, ge=1)
    warmup_epochs: float = Field(10.0, ge=0.0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # cosine floor as a fraction of lr


class TrainConfig(Section):
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # false forces fp32 whatever `precision` says (configs written before `precision`)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # medcl.precision: bf16 autocast where native
    channels_last: bool = True  # channels_last memory format for 2D CNNs (same values, faster kernels)
    checkpoint_every: int = Field(500, ge=1)  # steps
    snapshot_every: int | None = Field(None, ge=1)  # steps: also keep checkpoints/step-NNNNNN.pt (probe the run)
    log_every: int = Field(1, ge=1)  # steps
    progress: bool = True
    tensorboard: bool = False  # TensorBoard events under OUT/tb (pip install "medcl[tensorboard]"; warns once when missing)
    sync_batchnorm: bool = False  # distributed runs only

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("expected auto, cpu, cuda or cuda:N")


# The sections that only some methods use, in their YAML order; optim and train belong to every run.
SHARED_SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "sampling": SamplingConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
}


class MethodConfig(Section):
    """Base of the method sections.

    ``shared_sections``: the names of :data:`SHARED_SECTIONS` the method reads (the others are
    refused in its configs and left out of its ``config.yaml``). ``needs_manifest``: the method
    reads ``data.manifest`` (then ``data`` must be one of its shared sections).
    """

    shared_sections: ClassVar[tuple[str, ...]] = ()
    needs_manifest: ClassVar[bool] = False


class FrameSetMethodConfig(MethodConfig):
    """Methods that train on USCL frame sets (``medcl.sampling.pairs.frame_set_loader``)."""

    shared_sections: ClassVar[tuple[str, ...]] = ("data", "sampling", "augment", "model")
    needs_manifest: ClassVar[bool] = True


class USCLConfig(FrameSetMethodConfig):
    """USCL (Chen et al., MICCAI 2021): L = L_con + lambda_sup * L_sup."""

    temperature: float = Field(0.5, gt=0.0)
    lambda_sup: float = Field(0.2, ge=0.0)
    label_aware: bool = False  # SupCon-style contrast: known different labels negatives, same positives


class SimCLRConfig(FrameSetMethodConfig):
    """SimCLR (Chen et al., ICML 2020): NT-Xent only."""

    temperature: float = Field(0.5, gt=0.0)


class SupervisedConfig(FrameSetMethodConfig):
    """Plain supervised pretraining: cross-entropy on the labeled videos only."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class MoCoConfig(FrameSetMethodConfig):
    """MoCo v2 (He et al., CVPR 2020; Chen et al., arXiv 2020): InfoNCE against a queue of momentum keys."""

    temperature: float = Field(0.2, gt=0.0)
    momentum: float = Field(0.999, ge=0.0, lt=1.0)  # key encoder: theta_k <- m theta_k + (1 - m) theta_q
    # a multiple of optim.batch_size, at most the items of one epoch (checked when the data is read)
    queue_size: int = Field(65536, ge=1)


class SemiSupervisedConfig(MethodConfig):
    """Base of the semi-supervised baselines: per step optim.batch_size labeled frames and ``mu``
    times as many unlabeled frames (``medcl.sampling.labeled_unlabeled``); no ``sampling`` section."""

    shared_sections: ClassVar[tuple[str, ...]] = ("data", "augment", "model")
    needs_manifest: ClassVar[bool] = True
    mu: int = Field(7, ge=1)  # unlabeled-to-labeled ratio (FixMatch's mu)


class FixMatchConfig(SemiSupervisedConfig):
    """FixMatch (Sohn et al., NeurIPS 2020): CE + lambda_u * pseudo-label CE on strong views."""

    threshold: float = Field(0.95, ge=0.0, le=1.0)  # confidence of a pseudo-label
    lambda_u: float = Field(1.0, ge=0.0)
    randaugment_ops: int = Field(2, ge=1)  # strong augmentation: operations per image (RandAugment's N)
    cutout: float = Field(0.5, ge=0.0, le=1.0)  # Cutout side, at most this fraction of the image side

    @field_validator("randaugment_ops")
    @classmethod
    def _known_number_of_ops(cls, value: int) -> int:
        from medcl.sampling.augment import STRONG_OPS  # lazily: the augmentation module imports torch

        if value > len(STRONG_OPS):
            raise ValueError(f"at most {len(STRONG_OPS)} (the operations of medcl.sampling.augment.STRONG_OPS)")
        return value


class PiModelConfig(SemiSupervisedConfig):
    """Pi-model (Laine & Aila, ICLR 2017): CE + w(t) * squared difference of two passes' softmax."""

    consistency_weight: float = Field(100.0, ge=0.0)  # w_max (paper: 100 for the Pi-model)
    rampup_epochs: float = Field(80.0, ge=0.0)  # Gaussian ramp-up exp(-5 (1 - T)^2) of w over these epochs


class TemporalEnsemblingConfig(PiModelConfig):
    """Temporal Ensembling (Laine & Aila, ICLR 2017): CE + w(t) * squared difference to an EMA of past predictions."""

    consistency_weight: float = Field(30.0, ge=0.0)  # w_max (paper: 30 for temporal ensembling)
    alpha: float = Field(0.6, ge=0.0, lt=1.0)  # ensemble momentum Z <- alpha Z + (1 - alpha) z


# method name -> its section class (or "module:Class", imported when first needed)
METHOD_CONFIGS: dict[str, type[MethodConfig] | str] = {
    "uscl": USCLConfig,
    "simclr": SimCLRConfig,
    "supervised": SupervisedConfig,
    "mixcl": "medcl.methods.mixcl:MixCLConfig",
    "mixcl_cnn": "medcl.methods.mixcl_cnn:MixCLCNNConfig",
    "joint": "medcl.methods.joint:JointConfig",
    "moco": MoCoConfig,
    "fixmatch": FixMatchConfig,
    "pimodel": PiModelConfig,
    "temporal_ensembling": TemporalEnsemblingConfig,
}


def register_method_config(name: str, cls: type[MethodConfig]) -> None:
    """Make ``method: name`` valid, with section ``name:`` validated by ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
        raise TypeError(f"{cls!r} is not a MethodConfig subclass")
    _check_shared_sections(cls)
    METHOD_CONFIGS[name] = cls


def _check_shared_sections(cls: type[MethodConfig]) -> None:
    unknown = [name for name in cls.shared_sections if name not in SHARED_SECTIONS]
    if unknown:
        raise TypeError(f"{cls.__name__}.shared_sections: unknown {unknown}; choose from {list(SHARED_SECTIONS)}")
    if cls.needs_manifest and "data" not in cls.shared_sections:
        raise TypeError(f"{cls.__name__}.needs_manifest is set but 'data' is not in its shared_sections")


def method_config_class(name: str) -> type[MethodConfig]:
    if name not in METHOD_CONFIGS:
        raise ConfigError(f"method={name!r}: unknown method; choose one of {sorted(METHOD_CONFIGS)}")
    entry = METHOD_CONFIGS[name]
    if isinstance(entry, str):
        module_name, _, class_name = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), class_name)
        _check_shared_sections(entry)
        METHOD_CONFIGS[name] = entry
    return entry  # type: ignore[return-value]


class Config(Section):
    """The whole run. Build with :func:`load_config` or :meth:`Config.from_dict`."""

    method: str
    out: Path | None = None
    # shared sections: None when the method does not use them (MethodConfig.shared_sections)
    data: DataConfig | None = None
    sampling: SamplingConfig | None = None
    augment: AugmentConfig | None = None
    model: ModelConfig | None = None
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    params: MethodConfig = Field(default_factory=MethodConfig)  # the section named after `method`

    @model_validator(mode="before")
    @classmethod
    def _shared_sections_of_the_method(cls, values: Any) -> Any:
        """Default the sections the method uses; refuse the others (also for direct validation)."""
        if not isinstance(values, Mapping):
            return values
        values = dict(values)
        params = values.get("params")
        used = type(params).shared_sections if isinstance(params, MethodConfig) else ()
        problems = []
        for name in SHARED_SECTIONS:
            if name in used:
                if values.get(name) is None:
                    values[name] = {}
            elif values.get(name) is not None:
                problems.append(_unused_section_message(name, str(values.get("method")), type(params)))
        if problems:
            raise ValueError("\n  ".join(problems))
        return values

    @model_validator(mode="after")
    def _method_needs(self) -> Config:
        if type(self.params).needs_manifest and (self.data is None or self.data.manifest is None):
            raise ValueError(f"data.manifest is required by method {self.method!r} (data.manifest=PATH)")
        return self

    def unused_sections(self) -> tuple[str, ...]:
        """The shared sections this run's method does not use (absent from its ``to_dict()``)."""
        return tuple(name for name in SHARED_SECTIONS if name not in type(self.params).shared_sections)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str | Path | None = None) -> Config:
        """Validate a nested mapping (YAML layout, method section under its name).

        ``source`` (the file ``raw`` came from) names the file in warnings.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"configuration must be a mapping, got {type(raw).__name__}")
        raw = dict(copy.deepcopy(raw))
        method = raw.get("method")
        if not isinstance(method, str):
            raise ConfigError(f"method={method!r}: required, one of {sorted(METHOD_CONFIGS)}")
        params_cls = method_config_class(method)
        others = [k for k in raw if k in METHOD_CONFIGS and k != method]
        if others:
            raise ConfigError(f"{others[0]}: section of another method; this run's method is {method!r}")
        if "params" in raw:
            raise ConfigError("params: unknown key (put method options under the section named after the method)")
        section = raw.pop(method, None) or {}
        problems: list[str] = []
        unused = [name for name in SHARED_SECTIONS if name not in params_cls.shared_sections and raw.get(name) is not None]
        old_defaults = [name for name in unused if _holds_old_defaults(name, raw[name])]
        problems += [_unused_section_message(name, method, params_cls) for name in unused if name not in old_defaults]
        for name in unused:
            del raw[name]
        try:
            params = params_cls.model_validate(section)
        except ValidationError as exc:
            problems += _describe(exc, prefix=method)
            params = None
        try:
            cfg = cls.model_validate({**raw, "params": params if params is not None else params_cls.model_construct()})
        except ValidationError as exc:
            problems += _describe(exc)
            cfg = None
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        if old_defaults:
            where = f"{source}: " if source is not None else ""
            warnings.warn(f"{where}{', '.join(old_defaults)}: not used by method {method!r}; ignored (the defaults that "
                          "medcl wrote into every config before sections became per-method); remove them",
                          ConfigWarning, stacklevel=2)
        assert cfg is not None
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain-types mapping in the YAML layout, only the method's sections (round-trips
        through :meth:`from_dict`)."""
        out = self.model_dump(mode="json", exclude={"params", *self.unused_sections()})
        out[self.method] = self.params.model_dump(mode="json")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _unused_section_message(name: str, method: str, params_cls: type[MethodConfig]) -> str:
    sections = ", ".join(["optim", "train", *params_cls.shared_sections, method])
    return (f"{name}: not used by method {method!r} (its sections: {sections}); remove the section "
            "(configs written by medcl before sections became per-method carried it)")


def _holds_old_defaults(name: str, section: Any) -> bool:
    """True when ``section`` equals what medcl once wrote for every method: the section's defaults."""
    if not isinstance(section, Mapping):
        return False
    section_cls = SHARED_SECTIONS[name]
    try:
        return section_cls.model_validate(dict(section)) == section_cls()
    except ValidationError:
        return False


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _describe(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != "params"]
        key = ".".join(([prefix] if prefix else []) + loc) or prefix or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        if not loc and not prefix:
            lines.append(msg)
        elif err["type"] == "missing":
            lines.append(f"{key}: required")
        elif err["type"] == "finite_number":  # `inf`, not `'inf'`: the value as the user typed it
            lines.append(f"{key}={value}: must be a finite number")
        elif isinstance(value, Mapping) and err["type"] not in ("extra_forbidden",):
            lines.append(f"{key}: {msg}")
        else:
            lines.append(f"{key}={value!r}: {msg}")
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}={value!r}: not a valid value ({exc.__class__.__name__})") from None
    if isinstance(parsed, str) and _NUMBER.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), **base: Any) -> Config:
    """Load a YAML preset (or start from ``base``), apply ``key.sub=value`` overrides, validate.

    Errors in the file name the file; errors in values name the dotted key and the value.
    """
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    raw.update(base)
    raw = apply_overrides(raw, overrides)
    try:
        return Config.from_dict(raw, source=path)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise
