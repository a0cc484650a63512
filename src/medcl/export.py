"""Export a pretrained backbone as safetensors with a model card, and load it back.

``medcl export CHECKPOINT -o DIR`` writes::

    DIR/backbone.safetensors   the backbone's state dict (keys exactly as the plain MONAI network's),
                               metadata: format, architecture, kwargs (JSON), method, sha256, versions
    DIR/model_card.json        method, data summary, config, evaluation results (when present)
    DIR/MODEL_CARD.md          the same for people, with a plain-MONAI loading snippet

:func:`load_backbone` rebuilds the network from the metadata and loads the weights. It reads
safetensors only, so loading a file never unpickles (never runs) code. The architecture name maps
to a builder in a small registry (:func:`register_backbone_builder`): ``resnet18`` comes from
:mod:`medcl.models.backbones`, ``unetr_encoder`` from :mod:`medcl.models.unetr`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXPORT_FORMAT = "medcl-backbone-v1"
CHECKPOINT_FORMAT = "medcl-checkpoint-v1"
BACKBONE_FILE = "backbone.safetensors"
MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "MODEL_CARD.md"


class BackboneLoadError(ValueError):
    """A backbone file that cannot be loaded: the message names the file and the problem."""


class CheckpointError(ValueError):
    """A training checkpoint that cannot be exported: names the file and the problem."""


# --------------------------------------------------------------------------- builder registry

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_backbone_builder(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``load_backbone`` able to rebuild architecture ``name`` as ``builder(**kwargs)``."""
    _BUILDERS[name] = builder


# architectures whose module is imported only when a file needs it ("module:function")
_LAZY_BUILDERS: dict[str, str] = {"unetr_encoder": "medcl.models.unetr:build_encoder"}


def backbone_builder(name: str) -> Callable[..., nn.Module]:
    """The builder for an architecture name: the registry, then lazy entries, then medcl.models.backbones."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    if name in _LAZY_BUILDERS:
        import importlib

        module_name, _, attr = _LAZY_BUILDERS[name].partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise BackboneLoadError(f"architecture {name!r} needs {_LAZY_BUILDERS[name]}, which is unavailable: {exc}") from exc
        _BUILDERS[name] = builder
        return builder
    from medcl.models import backbones

    if name in backbones.BACKBONES:
        return backbones.BACKBONES[name]
    known = sorted(set(_BUILDERS) | set(_LAZY_BUILDERS) | set(backbones.BACKBONES))
    raise BackboneLoadError(f"unknown backbone architecture {name!r}; known: {known}")


# --------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best one in a run folder (checkpoints/final.pt, then last.pt)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "final.pt", path / "checkpoints" / "last.pt", path / "final.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoint found (looked for checkpoints/final.pt and checkpoints/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a ``medcl-checkpoint-v1`` file with ``weights_only=True`` and validate its layout."""
    path = resolve_checkpoint(path)
    try:
        from medcl.train.checkpoint import load_checkpoint  # the trainer's reader, when present
    except ImportError:
        load_checkpoint = None
    try:
        ckpt = load_checkpoint(path) if load_checkpoint is not None else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for bad files)
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format is {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    for key in ("model", "backbone"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: missing key {key!r}")
    if "name" not in ckpt["backbone"]:
        raise CheckpointError(f"{path}: 'backbone' entry has no 'name': {ckpt['backbone']!r}")
    return ckpt


def checkpoint_backbone_state(ckpt: Mapping[str, Any], path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The backbone's weights from a checkpoint dict, keys without the method's prefix."""
    try:
        from medcl.train.checkpoint import backbone_state_dict
    except ImportError:
        backbone_state_dict = None
    if backbone_state_dict is not None:
        state = dict(backbone_state_dict(ckpt))
    else:
        prefix = ckpt["backbone"].get("prefix", "backbone.")
        state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: no backbone weights under prefix {ckpt['backbone'].get('prefix', 'backbone.')!r}")
    return state


def backbone_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the checkpoint's backbone with its weights (eval mode) and return it with the dict."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    spec = ckpt["backbone"]
    network = backbone_builder(spec["name"])(**dict(spec.get("kwargs") or {}))
    _load_checked(network, checkpoint_backbone_state(ckpt, path), path, spec["name"])
    return network.eval(), ckpt


# --------------------------------------------------------------------------- safetensors


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
) -> Path:
    """Write a backbone state dict as safetensors with the metadata ``load_backbone`` needs."""
    from safetensors.torch import save_file

    state = network_or_state.state_dict() if isinstance(network_or_state, nn.Module) else network_or_state
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "architecture": architecture,
        "kwargs": json.dumps(dict(kwargs or {}), sort_keys=True),
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
        raise BackboneLoadError(f"backbone file not found: {file}")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error type and OSError)
        raise BackboneLoadError(f"{file}: not a readable safetensors file (corrupted or truncated?): {exc}") from exc
    if metadata.get("format") != EXPORT_FORMAT:
        raise BackboneLoadError(f"{file}: metadata 'format' is {metadata.get('format')!r}, expected {EXPORT_FORMAT!r}")
    if "architecture" not in metadata:
        raise BackboneLoadError(f"{file}: metadata has no 'architecture' (found keys {sorted(metadata)})")
    expected = metadata.get("sha256")
    if expected and tensor_digest(tensors) != expected:
        raise BackboneLoadError(f"{file}: weights do not match the stored sha256 checksum: the file was corrupted or modified")
    return tensors, metadata, file


def _load_checked(network: nn.Module, state: Mapping[str, torch.Tensor], file: str | Path, architecture: str) -> None:
    """load_state_dict with one readable message for missing / unexpected keys and bad shapes."""
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
        raise BackboneLoadError(f"{file}: weights do not fit architecture {architecture!r}: " + "; ".join(problems))
    network.load_state_dict(dict(state), strict=True)


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load an exported backbone (``DIR`` or ``DIR/backbone.safetensors``) as a MONAI network in eval mode.

    >>> net = load_backbone("exported/")          # doctest: +SKIP
    >>> features = net(torch.rand(1, 1, 224, 224))  # [1, 512] for the ResNet-18   # doctest: +SKIP

    ``device`` places the network (e.g. ``"cuda"``). Only safetensors are read: no pickled code
    runs. Errors name the file and the problem
    (corrupted bytes, checksum mismatch, unknown architecture, missing keys, wrong shapes).
    """
    tensors, metadata, file = read_backbone_file(path)  # read on CPU: the checksum is computed there
    architecture = metadata["architecture"]
    try:
        kwargs = json.loads(metadata.get("kwargs") or "{}")
    except json.JSONDecodeError as exc:
        raise BackboneLoadError(f"{file}: metadata 'kwargs' is not JSON: {metadata.get('kwargs')!r}") from exc
    try:
        builder = backbone_builder(architecture)
    except BackboneLoadError as exc:
        raise BackboneLoadError(f"{file}: {exc}") from exc
    try:
        network = builder(**kwargs)
    except TypeError as exc:
        raise BackboneLoadError(f"{file}: cannot build {architecture!r} with kwargs {kwargs}: {exc}") from exc
    _load_checked(network, tensors, file, architecture)
    return network.to(device).eval()


# --------------------------------------------------------------------------- model card


def _plain(value: Any) -> Any:
    """JSON-safe copy of a config-like value."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def find_in_config(config: Mapping[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def manifest_path_from_config(config: Mapping[str, Any] | None, base: Path | None = None) -> Path | None:
    """The data manifest a run was trained on (config ``data.manifest`` or similar), if it exists."""
    # pretraining: data.manifest; classification fine-tuning: data (a path) or train/test
    for key in ("data.manifest", "data", "train", "data.root", "data.path", "manifest"):
        value = find_in_config(config, key)
        if isinstance(value, str) and value:
            candidate = Path(value)
            if not candidate.is_absolute() and base is not None and not candidate.exists():
                candidate = base / candidate
            if candidate.exists():
                return candidate
    return None


def manifest_summary(manifest: str | Path) -> dict[str, Any]:
    """Videos, frames, patients and per-class counts of an ingest manifest."""
    from medcl.data.manifest import read_manifest

    records = read_manifest(manifest)
    classes: dict[str, dict[str, int]] = {}
    for record in records:
        entry = classes.setdefault(record.label or "(unlabeled)", {"videos": 0, "frames": 0})
        entry["videos"] += 1
        entry["frames"] += record.n_frames
    return {
        "manifest": str(manifest),
        "videos": len(records),
        "frames": sum(r.n_frames for r in records),
        "patients": len({r.patient_id for r in records}),
        "labeled_videos": sum(1 for r in records if r.label),
        "classes": dict(sorted(classes.items())),
    }


def evaluation_entry(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a fine-tuning run folder's results.json (None when there is none)."""
    results = Path(run_dir) / "results.json"
    if not results.is_file():
        return None
    try:
        data = json.loads(results.read_text())
    except json.JSONDecodeError:
        return {"source": str(results), "error": "not valid JSON"}
    if not isinstance(data, dict):
        return {"source": str(results), "error": "not a JSON object"}
    return {
        "source": str(results),
        "format": data.get("format"),
        "init": _plain(data.get("init")),
        "protocol": data.get("protocol"),
        "summary": _plain(data.get("summary", {})),
    }


def plain_monai_snippet(architecture: str, kwargs: Mapping[str, Any]) -> str | None:
    """Python that loads the exported weights into the plain MONAI network (no medcl needed)."""
    if architecture == "resnet18":
        dims, channels = kwargs.get("spatial_dims", 2), kwargs.get("in_channels", 1)
        return f"""from monai.networks.nets import ResNet
from safetensors.torch import load_file

net = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512],
             spatial_dims={dims}, n_input_channels={channels}, conv1_t_stride=2, feed_forward=False)
net.load_state_dict(load_file("backbone.safetensors"))  # strict: every key matches
net.eval()
features = net(image)  # image: float [batch, {channels}, H, W] -> features [batch, 512]"""
    if architecture == "unetr_encoder":
        k = {"spatial_dims": 3, "img_size": 96, "in_channels": 1, "patch_size": 16, "hidden_size": 768,
             "mlp_dim": 3072, "num_layers": 12, "num_heads": 12, "qkv_bias": False, **dict(kwargs)}
        size = k["img_size"] if isinstance(k["img_size"], (list, tuple)) else [k["img_size"]] * k["spatial_dims"]
        return f"""from monai.networks.nets import ViT
from safetensors.torch import load_file

net = ViT(in_channels={k['in_channels']}, img_size={tuple(size)}, patch_size={k['patch_size']},
          hidden_size={k['hidden_size']}, mlp_dim={k['mlp_dim']}, num_layers={k['num_layers']},
          num_heads={k['num_heads']}, proj_type="conv", classification=False,
          spatial_dims={k['spatial_dims']}, qkv_bias={k['qkv_bias']})
net.load_state_dict(load_file("backbone.safetensors"))  # strict: every key matches
net.eval()
last, hidden_states = net(image)  # tokens [batch, n_patches, {k['hidden_size']}]: last layer and every layer"""
    return None


def build_model_card(
    ckpt: Mapping[str, Any],
    checkpoint_path: Path,
    run_dir: Path | None,
    n_parameters: int,
    sha256: str,
    evaluation_runs: list[Path] = (),
) -> dict[str, Any]:
    config = _plain(ckpt.get("config") or {})
    spec = ckpt["backbone"]
    manifest = manifest_path_from_config(config, base=run_dir)
    data: dict[str, Any]
    if manifest is not None:
        try:
            data = manifest_summary(manifest)
        except Exception as exc:  # noqa: BLE001  (a card is still useful without the data summary)
            data = {"manifest": str(manifest), "error": str(exc)}
    else:
        data = {"manifest": find_in_config(config, "data.manifest"), "note": "manifest not found; no data summary"}
    import monai

    return {
        "format": "medcl-model-card-v1",
        "method": ckpt.get("method"),
        "architecture": spec["name"],
        "kwargs": _plain(spec.get("kwargs") or {}),
        "n_parameters": n_parameters,
        "weights_file": BACKBONE_FILE,
        "sha256": sha256,
        "source_checkpoint": str(checkpoint_path),
        "step": ckpt.get("step"),
        "epoch": ckpt.get("epoch"),
        "data": data,
        "config": config,
        "evaluation": [e for e in [evaluation_entry(d) for d in ([run_dir] if run_dir else []) + list(evaluation_runs)] if e],
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "machine": platform.platform(),
        },
    }


def model_card_markdown(card: Mapping[str, Any]) -> str:
    kwargs = dict(card.get("kwargs") or {})
    lines = [
        f"# medcl backbone: {card.get('method')} / {card['architecture']}",
        "",
        f"- Method: **{card.get('method')}** (pretrained with medcl)",
        f"- Architecture: `{card['architecture']}` with kwargs `{json.dumps(kwargs, sort_keys=True)}`",
        f"- Parameters: {card['n_parameters']:,}",
        f"- Weights: `{card['weights_file']}` (safetensors; sha256 of the tensors `{card['sha256'][:16]}...`)",
        f"- Source checkpoint: `{card['source_checkpoint']}` (step {card.get('step')}, epoch {card.get('epoch')})",
        f"- Exported: {card['exported']} with python {card['environment']['python']}, "
        f"torch {card['environment']['torch']}, MONAI {card['environment']['monai']}",
        "",
        "## Data",
        "",
    ]
    data = card.get("data") or {}
    if "videos" in data:
        lines += [
            f"Manifest `{data['manifest']}`: {data['videos']} videos ({data['labeled_videos']} labeled), "
            f"{data['frames']} frames, {data['patients']} patients.",
            "",
            "| class | videos | frames |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {c['videos']} | {c['frames']} |" for name, c in data["classes"].items()]
    else:
        lines.append(f"Manifest `{data.get('manifest')}`: {data.get('error') or data.get('note')}")
    lines += ["", "## Evaluation", ""]
    evaluations = card.get("evaluation") or []
    for entry in evaluations:
        from medcl.report.runs import flatten_summary

        title = f"`{entry['source']}`"
        if entry.get("protocol"):
            title += f" (protocol {entry['protocol']})"
        lines += [f"From {title}, mean ± std over test folds:", ""]
        cells = flatten_summary(entry.get("summary") or {})
        cells = {k: v for k, v in cells.items() if "per_class" not in k}
        if cells:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k.replace('_', ' ')} | {v} |" for k, v in cells.items()] + [""]
        else:
            lines += [f"({entry.get('error', 'no summary')})", ""]
    if not evaluations:
        lines.append("No results.json in the run folder: evaluate with `medcl finetune` (then export with "
                     "`--results FINETUNE_RUN` to include its results here).")
    lines += ["", "## Loading", "", "With medcl:", "", "```python", "import medcl",
              'net = medcl.load_backbone("path/to/export_dir")  # or the .safetensors file', "```", ""]
    snippet = plain_monai_snippet(card["architecture"], kwargs)
    if snippet is not None:
        lines += [
            "With plain MONAI (no medcl; the keys match the MONAI network's state dict exactly):",
            "",
            "```python",
            snippet,
            "```",
            "",
            "Inputs: grayscale images scaled to [0, 1] (medcl's classification fine-tuning then standardises "
            "with mean 0.5, std 0.25).",
        ]
    else:
        lines += ["With safetensors: `safetensors.torch.load_file(\"backbone.safetensors\")` gives the state dict; "
                  f"build `{card['architecture']}` with the kwargs above and `load_state_dict` it."]
    lines += ["", "## Configuration", "", "```json", json.dumps(card.get("config") or {}, indent=2), "```", ""]
    return "\n".join(lines)


def export_backbone(checkpoint: str | Path, out_dir: str | Path, evaluation_runs: list[str | Path] = ()) -> Path:
    """Export a checkpoint's (or run folder's) backbone to ``out_dir``; returns the safetensors path.

    The model card includes the ``results.json`` summary of the checkpoint's run folder and of each
    fine-tuning run folder in ``evaluation_runs`` (e.g. ``medcl finetune`` runs started from it).
    """
    missing = [str(d) for d in evaluation_runs if not (Path(d) / "results.json").is_file()]
    if missing:
        raise CheckpointError(f"no results.json in evaluation run folder(s) {missing}")
    checkpoint_path = resolve_checkpoint(checkpoint)
    network, ckpt = backbone_from_checkpoint(checkpoint_path)
    spec = ckpt["backbone"]
    run_dir = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = network.state_dict()
    from medcl import __version__

    file = save_backbone(
        state,
        out_dir / BACKBONE_FILE,
        spec["name"],
        spec.get("kwargs") or {},
        extra_metadata={"method": str(ckpt.get("method")), "step": str(ckpt.get("step")), "medcl_version": __version__},
    )
    n_parameters = sum(p.numel() for p in network.parameters())
    card = build_model_card(ckpt, checkpoint_path, run_dir, n_parameters, tensor_digest(state),
                            [Path(d) for d in evaluation_runs])
    (out_dir / MODEL_CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / MODEL_CARD_MD).write_text(model_card_markdown(card))
    return file
