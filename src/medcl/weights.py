"""The one home of weights: checkpoints, exported backbones, initialisation specs.

Two file kinds, each written and read here only:

- a **training checkpoint** (``medcl-checkpoint-v1``): a ``torch.save``-d dict of plain types and
  tensors, written atomically by :func:`save_checkpoint`, read with ``weights_only=True`` (never
  unpickling code) by :func:`load_checkpoint`::

      {"format", "method", "config", "model": method.state_dict(), "optimizer", "scheduler",
       "step", "epoch", "rng", "loader", "backbone": {"name", "kwargs", "prefix", "input"},
       "metadata"}

- an **exported backbone** (``medcl-backbone-v1``): ``backbone.safetensors`` whose keys are
  exactly the plain MONAI network's, with metadata (architecture, kwargs, input convention,
  sha256 of the tensors), written by :func:`save_backbone`, read by :func:`load_backbone`.

An **initialisation spec** (:class:`InitSpec`, what ``--init`` takes) names either: ``scratch``,
a checkpoint file, a pretraining run folder (its ``checkpoints/final.pt``), an export folder or
``.safetensors`` file, each optionally as ``NAME=PATH``. :func:`load_init` turns any of them into
a :class:`LoadedBackbone`: the network with its weights, its architecture and kwargs, and the
:class:`~medcl.inputs.InputSpec` its inputs must follow.

Architectures are built through the one registry, :func:`medcl.models.backbones.build_backbone`.
Every problem raises :class:`WeightsError` naming the file and what is wrong. Weights are checked
before they are used or written: no reader or writer accepts a tensor holding NaN or Inf (the
message names the file and the first such tensor), and no network is built from a file before its
kwargs are within :data:`KWARG_LIMITS` and its tensors' shapes match the architecture (checked on
PyTorch's ``meta`` device, which allocates nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcl.inputs import InputSpec
from medcl.models import backbones, layouts

CHECKPOINT_FORMAT = "medcl-checkpoint-v1"
EXPORT_FORMAT = "medcl-backbone-v1"
BACKBONE_FILE = "backbone.safetensors"
REQUIRED_KEYS = ("format", "method", "config", "model", "step", "backbone")


class WeightsError(ValueError):
    """A checkpoint or backbone file that cannot be used: the message names the file and the problem."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """The weights file or folder does not exist (also a FileNotFoundError)."""


# Older names of the one error type (callers catch either)
CheckpointError = WeightsError
BackboneLoadError = WeightsError

register_backbone_builder = backbones.register_backbone


# --------------------------------------------------------------------------- finite weights


def first_non_finite(state: Mapping[str, Any]) -> str | None:
    """The key of the first floating-point tensor of ``state`` (in its order) that holds NaN or
    Inf, or None. One fused norm over all tensors answers the common case; only when that norm is
    not finite (a NaN / Inf, or finite values so large that their squares overflow) is each
    tensor looked at."""
    floats = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not floats or bool(torch.isfinite(torch.nn.utils.get_total_norm(list(floats.values())))):
        return None
    return next((k for k, v in floats.items() if not bool(torch.isfinite(v).all())), None)


def describe_non_finite(name: str, tensor: torch.Tensor) -> str:
    """``tensor 'name' holds 3 NaN and 0 Inf of 9408 values``."""
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    return f"tensor {name!r} holds {nan} NaN and {inf} Inf of {tensor.numel()} values"


def check_finite(state: Mapping[str, Any], source: str | Path) -> None:
    """Raise :class:`WeightsError` naming ``source`` and the first tensor holding NaN / Inf."""
    bad = first_non_finite(state)
    if bad is not None:
        raise WeightsError(f"{source}: non-finite weights: {describe_non_finite(bad, state[bad])} (weights of a "
                           "diverged training run; use an earlier checkpoint or retrain with a lower optim.lr)")


# --------------------------------------------------------------------------- checkpoints

# ``save_checkpoint`` writes ``DIR/.NAME.PID.tmp`` first; a process killed while writing leaves it
_TEMPORARY = re.compile(r"\.(?P<name>.+\.pt)\.(?P<pid>\d+)\.tmp")


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(folder: str | Path, *, all_stale: bool = False) -> list[Path]:
    """Delete the temporary checkpoint files (``.NAME.pt.PID.tmp``) in ``folder`` that no live
    process is writing: those of dead pids, or every one when ``all_stale`` (the caller holds the
    run folder's lock, so nobody else writes there). Returns the removed paths."""
    removed = []
    for path in sorted(Path(folder).glob(".*.pt.*.tmp")):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or not (all_stale or not _pid_alive(int(match["pid"]))):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary file beside it, fsync, rename):
    a crash while writing leaves the previous file intact. A checkpoint whose ``model`` holds
    NaN / Inf is refused (:class:`WeightsError`): a file on disk is always a usable state."""
    path = Path(path)
    check_finite(checkpoint.get("model") or {}, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best one in a run folder (checkpoints/final.pt, then last.pt)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "final.pt", path / "checkpoints" / "last.pt", path / "final.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise WeightsError(f"{path}: no checkpoint found (looked for checkpoints/final.pt and checkpoints/last.pt)")
    if not path.is_file():
        raise MissingWeightsError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a medcl checkpoint (a file or a run folder) with ``weights_only=True`` and check its
    format and required keys."""
    path = resolve_checkpoint(path)
    return validate_checkpoint(_torch_load(path, map_location), path)


def _torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (never unpickles code); any failure names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None


def validate_checkpoint(ckpt: Any, path: str | Path) -> dict[str, Any]:
    """``ckpt`` (what ``torch.load`` gave for ``path``) if it is a usable medcl checkpoint."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WeightsError(f"{path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise WeightsError(f"{path}: missing key(s) {missing}")
    if not isinstance(ckpt["backbone"], Mapping) or "name" not in ckpt["backbone"]:
        raise WeightsError(f"{path}: 'backbone' entry has no 'name': {ckpt['backbone']!r}")
    if not isinstance(ckpt["model"], Mapping):
        raise WeightsError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, expected a state dict")
    check_finite(ckpt["model"], path)
    return ckpt


def backbone_state_dict(ckpt: Mapping[str, Any], path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The backbone's weights from a loaded checkpoint, keys without the method's prefix."""
    prefix = ckpt.get("backbone", {}).get("prefix", "backbone.")
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise WeightsError(f"{path}: checkpoint has no weights under prefix {prefix!r} in 'model'")
    return state


def checkpoint_input(ckpt: Mapping[str, Any]) -> InputSpec:
    """The input convention recorded with a checkpoint's backbone (medcl's default when absent)."""
    info = ckpt.get("backbone") or {}
    return InputSpec.from_dict(info.get("input"), int((info.get("kwargs") or {}).get("in_channels", 1)))


def build_pretrained_backbone(ckpt: Mapping[str, Any], path: str | Path = "<checkpoint>") -> nn.Module:
    """Rebuild the backbone named in a loaded checkpoint and load its weights (strict)."""
    info = ckpt["backbone"]
    return build_checked(info["name"], dict(info.get("kwargs") or {}), backbone_state_dict(ckpt, path), path)


def backbone_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a checkpoint's (or run folder's) backbone with its weights, in eval mode, with the dict."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path)
    return build_pretrained_backbone(ckpt, path).eval(), ckpt


# --------------------------------------------------------------------------- building


# Largest value of each size-like kwarg a weights file may ask for, per architecture (``"*"``: any
# other architecture, e.g. one added with ``register_backbone``). A file's metadata is untrusted:
# ``in_channels: 10000000`` would otherwise allocate ~125 GB before any check. img_size and
# patch_size bound every element of a list.
KWARG_LIMITS: dict[str, dict[str, int]] = {
    "resnet18": {"in_channels": 64, "spatial_dims": 3},
    "unetr_encoder": {"in_channels": 64, "spatial_dims": 3, "img_size": 1024, "patch_size": 1024,
                      "hidden_size": 4096, "mlp_dim": 16384, "num_layers": 48, "num_heads": 64},
    "*": {"in_channels": 64, "spatial_dims": 3, "img_size": 1024, "hidden_size": 4096, "num_layers": 48},
}


def check_backbone_kwargs(architecture: str, kwargs: Any, source: str | Path) -> dict[str, Any]:
    """``kwargs`` as a dict, after checking each size-like value is a whole number in
    ``1..KWARG_LIMITS[architecture][key]``; raises :class:`WeightsError` naming the file."""
    if not isinstance(kwargs, Mapping):
        raise WeightsError(f"{source}: kwargs of {architecture!r} must be a mapping, got {kwargs!r}")
    limits = KWARG_LIMITS.get(architecture, KWARG_LIMITS["*"])
    for key, limit in limits.items():
        if key not in kwargs:
            continue
        value = kwargs[key]
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in values):
            raise WeightsError(f"{source}: kwargs {key}={value!r} out of range for {architecture!r}: expected "
                               f"whole number(s) from 1 to {limit}; the file's metadata is corrupted or not medcl's")
    return dict(kwargs)


def _build(architecture: str, kwargs: Mapping[str, Any], source: str | Path) -> nn.Module:
    try:
        return backbones.build_backbone(architecture, **dict(kwargs))
    except KeyError as exc:
        raise WeightsError(f"{source}: {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{source}: cannot build {architecture!r} with kwargs {dict(kwargs)}: {exc}") from None


def build_checked(architecture: str, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                  source: str | Path) -> nn.Module:
    """Build ``architecture(**kwargs)`` from the registry and load ``state`` strictly; one readable
    message for unknown architectures, bad or out-of-range kwargs, non-finite weights, missing /
    unexpected keys and bad shapes. Everything is checked before the network is allocated: it is
    first built on the ``meta`` device (no memory), so its size is at most that of ``state``."""
    kwargs = check_backbone_kwargs(architecture, kwargs, source)
    check_finite(state, source)
    try:
        with torch.device("meta"):
            network = _build(architecture, kwargs, source)
    except (NotImplementedError, RuntimeError):  # a builder that computes on its tensors: check after building
        network = _build(architecture, kwargs, source)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shapes = [
        f"{k}: file {tuple(state[k].shape)} vs {architecture} {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatch(es): {'; '.join(bad_shapes[:5])}")
    if problems:
        raise WeightsError(f"{source}: weights do not fit architecture {architecture!r}: " + "; ".join(problems))
    if any(t.is_meta for t in expected.values()):
        network = _build(architecture, kwargs, source)
    network.load_state_dict(dict(state), strict=True)
    return network


# --------------------------------------------------------------------------- exported backbones (safetensors)


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes (in key order): detects corrupted weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_backbone(
    network_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    architecture: str,
    kwargs: Mapping[str, Any] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    input_spec: InputSpec | None = None,
    layout: str = "monai",
    in_channels: int | None = None,
) -> Path:
    """Write a backbone state dict as safetensors with the metadata :func:`load_backbone` needs.

    ``layout="torchvision"`` (ResNets) stores torchvision's / timm's keys and shapes
    (:mod:`medcl.models.layouts`); ``in_channels`` adapts the stem (e.g. 3: a gray image
    replicated to RGB gives the same features). :func:`load_backbone` reads either layout back."""
    from safetensors.torch import save_file

    state = network_or_state.state_dict() if isinstance(network_or_state, nn.Module) else network_or_state
    check_finite(state, path)
    kwargs = dict(kwargs or {})
    if layout not in layouts.LAYOUTS:
        raise WeightsError(f"{path}: unknown layout {layout!r}; choose one of {list(layouts.LAYOUTS)}")
    if layout == "torchvision" or in_channels is not None:
        if not architecture.startswith("resnet"):
            raise WeightsError(f"{path}: layout {layout!r} / in_channels apply to ResNets, not {architecture!r}")
        spec = input_spec or InputSpec(in_channels=int(kwargs.get("in_channels", 1)))
        if layout == "torchvision":
            state = layouts.monai_to_torchvision(state, in_channels)
        else:
            state = layouts.adapt_conv1(state, in_channels)
        if in_channels is not None and in_channels != spec.in_channels:
            kwargs["in_channels"] = in_channels
            input_spec = InputSpec(in_channels, spec.mean if len(spec.mean) == 1 else spec.mean[:1],
                                   spec.std if len(spec.std) == 1 else spec.std[:1])
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    spec = input_spec or InputSpec(in_channels=int(kwargs.get("in_channels", 1)))
    metadata = {
        "format": EXPORT_FORMAT,
        "architecture": architecture,
        "layout": layout,
        "kwargs": json.dumps(kwargs, sort_keys=True),
        "input": json.dumps(spec.to_dict(), sort_keys=True),
        "sha256": tensor_digest(tensors),
        "torch_version": torch.__version__,
    }
    try:
        import monai

        metadata["monai_version"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors creates the file owner-only; weights are meant to be shared
    tmp.replace(path)
    return path


def read_backbone_file(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Tensors and metadata of an exported backbone (a DIR or the .safetensors file), validated."""
    from safetensors import safe_open

    path = Path(path)
    file = path / BACKBONE_FILE if path.is_dir() else path
    if not file.is_file():
        raise MissingWeightsError(f"backbone file not found: {file}")
    if _file_kind(file) == "torch":
        raise WeightsError(_torch_file_message(file))
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error type and OSError)
        raise WeightsError(f"{file}: not a readable safetensors file (corrupted or truncated?): {exc}") from exc
    if metadata.get("format") != EXPORT_FORMAT:
        raise WeightsError(f"{file}: metadata 'format' is {metadata.get('format')!r}, expected {EXPORT_FORMAT!r}")
    if "architecture" not in metadata:
        raise WeightsError(f"{file}: metadata has no 'architecture' (found keys {sorted(metadata)})")
    expected = metadata.get("sha256")
    if expected and tensor_digest(tensors) != expected:
        raise WeightsError(f"{file}: weights do not match the stored sha256 checksum: the file was corrupted or modified")
    check_finite(tensors, file)  # with or without a checksum: a checksum proves integrity, not usability
    return tensors, metadata, file


def read_backbone_metadata(file: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, from its header only (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error type and OSError)
        raise WeightsError(f"{file}: not a readable safetensors file (corrupted or truncated?): {exc}") from exc


def _file_kind(file: Path) -> str:
    """``"safetensors"`` (an 8-byte little-endian header length, then the JSON header), ``"torch"``
    (``torch.save``: a zip archive, or a pickle in the legacy format) or ``"unknown"``."""
    with open(file, "rb") as handle:
        head = handle.read(9)
    size = file.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    return "unknown"


def _torch_file_message(file: Path) -> str:
    try:
        ckpt = load_checkpoint(file)
    except WeightsError:
        return (f"{file}: a PyTorch file (torch.save), not an exported backbone: load_backbone reads only the "
                f"{BACKBONE_FILE} that `medcl export` writes")
    return (f"{file}: this is a medcl training checkpoint (method {ckpt.get('method')}, step {ckpt.get('step')}), "
            "not an exported backbone: use `medcl export` first (or pass it to --init)")


def metadata_json(metadata: Mapping[str, str], key: str, file: str | Path, default: str) -> Any:
    """A JSON value of a weights file's metadata (``default`` when the key is absent)."""
    try:
        return json.loads(metadata.get(key) or default)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{file}: metadata {key!r} is not JSON: {metadata.get(key)!r}") from exc


def read_exported(path: str | Path) -> tuple[nn.Module, str, dict[str, Any], InputSpec, Path]:
    """(network in eval mode, architecture, its kwargs, input convention, file) of an exported backbone."""
    tensors, metadata, file = read_backbone_file(path)  # read on CPU: the checksum is computed there
    kwargs = check_backbone_kwargs(metadata["architecture"], metadata_json(metadata, "kwargs", file, "{}"), file)
    try:
        spec = InputSpec.from_dict(metadata_json(metadata, "input", file, "null"), int(kwargs.get("in_channels", 1)))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{file}: metadata 'input' is not a valid input convention: {exc}") from None
    layout = metadata.get("layout", "monai")
    if layout == "torchvision":
        try:
            tensors = layouts.torchvision_to_monai(tensors, in_channels=None)
        except layouts.LayoutError as exc:
            raise WeightsError(f"{file}: {exc}") from None
    elif layout != "monai":
        raise WeightsError(f"{file}: metadata 'layout' is {layout!r}, expected one of {list(layouts.LAYOUTS)}")
    network = build_checked(metadata["architecture"], kwargs, tensors, file)
    return network.eval(), metadata["architecture"], kwargs, spec, file


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load an exported backbone (``DIR`` or ``DIR/backbone.safetensors``) as a MONAI network in eval mode.

    >>> net = load_backbone("exported/")          # doctest: +SKIP
    >>> features = net(torch.rand(1, 1, 224, 224))  # [1, 512] for the ResNet-18   # doctest: +SKIP

    ``device`` places the network (e.g. ``"cuda"``). Only safetensors are read: no pickled code
    runs. Errors name the file and the problem (corrupted bytes, checksum mismatch, unknown
    architecture, missing keys, wrong shapes).
    """
    network = read_exported(path)[0]
    return network.to(device).eval()


# --------------------------------------------------------------------------- initialisation specs


@dataclass
class InitSpec:
    """A backbone initialisation: ``scratch`` (path None), a medcl checkpoint, a run folder or
    exported weights (file or folder).

    A path with a ``{fold}`` placeholder (and optionally ``{repeat}``; both 0-based, as in
    results.json) is a *per-fold* init: cross-validation loads ``path.format(repeat=r, fold=f)``
    for each fold, e.g. ``runs/pocus-fold{fold}/checkpoints/final.pt`` for backbones each
    pretrained on one fold's training videos only (never on its test videos)."""

    name: str
    path: str | None = None

    @property
    def per_fold(self) -> bool:
        return self.path is not None and "{fold}" in self.path

    def for_fold(self, repeat: int, fold: int) -> InitSpec:
        """The init of one cross-validation fold (itself unless :attr:`per_fold`)."""
        if not self.per_fold:
            return self
        try:
            path = self.path.format(repeat=repeat, fold=fold)
        except (KeyError, IndexError, ValueError) as exc:
            raise WeightsError(f"initialisation {self.name!r}: path {self.path!r}: only {{repeat}} and {{fold}} "
                               f"placeholders are allowed ({type(exc).__name__}: {exc})") from None
        return InitSpec(self.name, path)

    @staticmethod
    def parse(spec: str) -> InitSpec:
        """``scratch`` | ``PATH`` | ``NAME=PATH``. The default name of a checkpoint inside a
        ``RUN/checkpoints/`` folder is ``RUN``; of a folder, its name; otherwise the file stem."""
        if spec in ("scratch", "random"):
            return InitSpec("scratch")
        name, sep, path = spec.partition("=")
        if sep and path in ("scratch", "random"):
            return InitSpec(name)
        if not sep:
            path, p = spec, Path(spec)
            if p.parent.name == "checkpoints":
                name = p.parent.parent.name or p.stem
            elif p.suffix == "" or p.name == BACKBONE_FILE:  # a run / export folder
                name = p.name if p.suffix == "" else p.parent.name
            else:
                name = p.stem
        if not name:
            raise WeightsError(f"--init {spec!r}: empty name (use NAME=PATH)")
        return InitSpec(name, path)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path}


def unique_inits(specs: list[str | InitSpec]) -> list[InitSpec]:
    """Parse specs; repeated names get ``-2``, ``-3`` ... so run folders never collide."""
    inits = [InitSpec(s.name, s.path) if isinstance(s, InitSpec) else InitSpec.parse(s) for s in specs]
    seen: dict[str, int] = {}
    for spec in inits:
        if spec.name in seen:
            seen[spec.name] += 1
            spec.name = f"{spec.name}-{seen[spec.name]}"
        else:
            seen[spec.name] = 1
    return inits


@dataclass
class LoadedBackbone:
    """What an init spec resolves to. ``network`` is None for scratch (the caller builds it)."""

    init: InitSpec
    network: nn.Module | None
    architecture: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None
    input: InputSpec = field(default_factory=InputSpec)
    source: str = "random initialisation"


def resolve_init_path(init: InitSpec) -> Path:
    """The file an init spec points to: a run folder gives its checkpoint, an export folder its
    safetensors file."""
    if init.path is None:
        raise WeightsError(f"initialisation {init.name!r} is scratch: it has no file")
    path = Path(init.path)
    if path.is_dir():
        for candidate in (BACKBONE_FILE, "checkpoints/final.pt", "checkpoints/last.pt"):
            if (path / candidate).is_file():
                return path / candidate
        raise MissingWeightsError(f"initialisation {init.name!r}: {path} holds neither {BACKBONE_FILE} nor checkpoints/final.pt")
    if not path.is_file():
        raise MissingWeightsError(f"initialisation {init.name!r}: file not found: {path}")
    return path


def load_init(init: InitSpec | str, expect: str | None = None) -> LoadedBackbone:
    """Resolve an init spec to its backbone (weights loaded, eval mode) and input convention.

    ``expect``: the architecture the caller needs (e.g. ``"unetr_encoder"`` for UNETR
    fine-tuning); another architecture is an error naming both. Scratch returns no network.
    """
    init = InitSpec.parse(init) if isinstance(init, str) else init
    if init.path is None:
        return LoadedBackbone(init, None, None)
    path = resolve_init_path(init)

    def check(architecture: str) -> None:
        if expect is not None and architecture != expect:
            raise WeightsError(f"{path}: backbone is {architecture!r}, but this task needs {expect!r}")

    kind = _file_kind(path)
    loaded = _torch_load(path) if kind == "torch" else None  # read once, whatever it turns out to be
    plain = _plain_state_dict(path, kind, loaded)
    if plain is not None:  # a torchvision / timm ResNet-18 state dict (e.g. ImageNet weights on disk)
        check("resnet18")
        try:
            state = layouts.torchvision_to_monai(plain, in_channels=1)
        except layouts.LayoutError as exc:
            raise WeightsError(f"{path}: {exc}") from None
        architecture, kwargs = "resnet18", {"in_channels": 1}
        network = build_checked(architecture, kwargs, state, path).eval()
        spec = InputSpec(1, layouts.IMAGENET_GRAY_MEAN, layouts.IMAGENET_GRAY_STD)
        source = f"torchvision/timm state dict {path} (RGB stem folded to gray; ImageNet normalisation)"
    elif path.suffix == ".safetensors":
        metadata = read_backbone_metadata(path)
        if "card" in metadata:  # a fine-tuned model (medcl.evaluate.models writes its card there)
            raise WeightsError(f"initialisation {init.name!r}: {path} is a fine-tuned {metadata.get('architecture')}, "
                               "not a backbone; initialise from pretraining weights (a checkpoint, run folder or export)")
        check(metadata.get("architecture", "?"))
        network, architecture, kwargs, spec, file = read_exported(path)
        state = dict(network.state_dict())
        source = f"exported weights {file}"
    else:
        ckpt = validate_checkpoint(loaded if loaded is not None else _torch_load(path), path)
        info = ckpt["backbone"]
        architecture, kwargs = info["name"], dict(info.get("kwargs") or {})
        check(architecture)
        state = backbone_state_dict(ckpt, path)
        network = build_checked(architecture, kwargs, state, path).eval()
        spec = checkpoint_input(ckpt)
        source = f"checkpoint {path} (method {ckpt.get('method')}, step {ckpt.get('step')})"
    return LoadedBackbone(init, network, architecture, kwargs, state, spec, source)


def _plain_state_dict(path: Path, kind: str, loaded: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` when it is a plain (not medcl) state dict in torchvision / timm
    ResNet layout: safetensors without medcl metadata, or a ``torch.save``-d dict (``loaded``, read
    with ``weights_only=True``; also under a ``state_dict`` / ``model`` key). None for medcl files."""
    if kind == "safetensors":
        if read_backbone_metadata(path).get("format") == EXPORT_FORMAT:
            return None
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error type)
            raise WeightsError(f"{path}: not a readable safetensors file (corrupted or truncated?): {exc}") from exc
    elif kind == "torch":
        if not isinstance(loaded, Mapping) or loaded.get("format") == CHECKPOINT_FORMAT:
            return None
        state = loaded.get("state_dict", loaded.get("model", loaded))
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            return None
    else:
        return None
    if not layouts.looks_like_torchvision_resnet(state):
        raise WeightsError(f"{path}: a plain state dict, but not in torchvision / timm ResNet-18 layout "
                           f"(keys {sorted(state)[:4]} ...); medcl reads medcl checkpoints, medcl exports and "
                           "torchvision / timm resnet18 state dicts")
    check_finite(state, path)
    return dict(state)


def unetr_from_checkpoint(ckpt: Mapping[str, Any], out_channels: int, img_size: Any = None, **kwargs: Any) -> nn.Module:
    """A UNETR whose encoder matches (and is loaded from) a MixCL pretraining checkpoint dict."""
    from medcl.models.unetr import build_unetr, load_encoder_weights

    backbone = ckpt.get("backbone") or {}
    if backbone.get("name") != "unetr_encoder":
        raise WeightsError(f"checkpoint backbone is {backbone.get('name')!r}, expected 'unetr_encoder'")
    enc = check_backbone_kwargs("unetr_encoder", backbone.get("kwargs") or {}, "<checkpoint>")
    if img_size is not None:
        enc["img_size"] = img_size
    enc.pop("qkv_bias", None)
    net = build_unetr(out_channels=out_channels, **enc, **kwargs)
    load_encoder_weights(net, backbone_state_dict(ckpt))
    return net
