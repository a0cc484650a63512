"""``medcl export``: a pretrained backbone as safetensors plus a model card.

``medcl export CHECKPOINT -o DIR`` writes::

    DIR/backbone.safetensors   the backbone's state dict (keys exactly as the plain MONAI network's),
                               metadata: format, architecture, kwargs, input convention, sha256
    DIR/model_card.json        method, data summary, input convention, config, evaluation results
    DIR/MODEL_CARD.md          the same for people, with a plain-MONAI loading snippet

Reading and writing the weights is :mod:`medcl.weights`; the input convention stated on the card
is :mod:`medcl.inputs` (the one fine-tuning, the report and prediction apply).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medcl.inputs import InputSpec
from medcl.report.runs import flatten_summary
from medcl.runfolder import refuse_existing, run_lock
from medcl.weights import (
    BACKBONE_FILE,
    WeightsError,
    backbone_from_checkpoint,
    checkpoint_input,
    read_backbone_metadata,
    resolve_checkpoint,
    save_backbone,
)

MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "MODEL_CARD.md"
EXPORT_FILES = (BACKBONE_FILE, MODEL_CARD_JSON, MODEL_CARD_MD)


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


def plain_monai_snippet(architecture: str, kwargs: Mapping[str, Any], layout: str = "monai") -> str | None:
    """Python that loads the exported weights into the plain network (no medcl needed)."""
    if architecture == "resnet18" and layout == "torchvision":
        channels = kwargs.get("in_channels", 1)
        stem = ("" if channels == 3 else
                f"\nnet.conv1 = torch.nn.Conv2d({channels}, 64, 7, 2, 3, bias=False)  # medcl's {channels}-channel stem")
        return f"""import torch
import torchvision  # or: net = timm.create_model("resnet18", num_classes=0{'' if channels == 3 else f', in_chans={channels}'})
from safetensors.torch import load_file

net = torchvision.models.resnet18()
net.fc = torch.nn.Identity()  # the export holds the backbone, not ImageNet's classifier{stem}
net.load_state_dict(load_file("backbone.safetensors"))  # strict: every key and shape matches
net.eval()
features = net(image)  # image: float [batch, {channels}, H, W] -> features [batch, 512]"""
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
        "input": checkpoint_input(ckpt).to_dict(),
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
    spec = InputSpec.from_dict(card.get("input"), int(kwargs.get("in_channels", 1)))
    lines += ["", "## Inputs", "", f"The network expects {spec.describe()} (pretraining, medcl's fine-tuning, "
              "report and prediction all feed it exactly this; see medcl.inputs)."]
    lines += ["", "## Loading", "", "With medcl:", "", "```python", "import medcl",
              'net = medcl.load_backbone("path/to/export_dir")  # or the .safetensors file', "```", ""]
    layout = card.get("layout", "monai")
    snippet = plain_monai_snippet(card["architecture"], kwargs, layout)
    if snippet is not None:
        lines += [
            f"Without medcl ({layout} layout: the keys match that network's state dict exactly):",
            "",
            "```python",
            snippet,
            "```",
            "",
        ]
    else:
        lines += ["With safetensors: `safetensors.torch.load_file(\"backbone.safetensors\")` gives the state dict; "
                  f"build `{card['architecture']}` with the kwargs above and `load_state_dict` it."]
    lines += ["", "## Configuration", "", "```json", json.dumps(card.get("config") or {}, indent=2), "```", ""]
    return "\n".join(lines)


def export_backbone(checkpoint: str | Path, out_dir: str | Path, evaluation_runs: list[str | Path] = (),
                    overwrite: bool = False, layout: str | None = None, in_channels: int | None = None) -> Path:
    """Export a checkpoint's (or run folder's) backbone to ``out_dir``; returns the safetensors path.

    The model card includes the ``results.json`` summary of the checkpoint's run folder and of each
    fine-tuning run folder in ``evaluation_runs`` (e.g. ``medcl finetune`` runs started from it).
    ``out_dir`` is locked while it is written (:func:`medcl.runfolder.run_lock`); one that already
    holds an export is refused (:class:`~medcl.runfolder.RunFolderError`) unless ``overwrite``.
    Non-finite weights (a diverged run) are refused with :class:`WeightsError` naming the tensor.
    ``layout``: ``"torchvision"`` (the default for ResNets: torchvision's / timm's keys and shapes)
    or ``"monai"``; ``in_channels`` adapts a ResNet's stem (3: gray replicated to RGB).
    """
    missing = [str(d) for d in evaluation_runs if not (Path(d) / "results.json").is_file()]
    if missing:
        raise WeightsError(f"no results.json in evaluation run folder(s) {missing}")
    checkpoint_path = resolve_checkpoint(checkpoint)
    network, ckpt = backbone_from_checkpoint(checkpoint_path)  # refuses NaN / Inf weights
    spec = ckpt["backbone"]
    run_dir = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent
    out_dir = Path(out_dir)
    with run_lock(out_dir, "medcl export"):
        refuse_existing(out_dir, EXPORT_FILES, overwrite, "an export")
        state = network.state_dict()
        from medcl._version import __version__

        layout = layout or ("torchvision" if str(spec["name"]).startswith("resnet") else "monai")
        file = save_backbone(
            state,
            out_dir / BACKBONE_FILE,
            spec["name"],
            spec.get("kwargs") or {},
            extra_metadata={"method": str(ckpt.get("method")), "step": str(ckpt.get("step")), "medcl_version": __version__},
            input_spec=checkpoint_input(ckpt),
            layout=layout,
            in_channels=in_channels,
        )
        metadata = read_backbone_metadata(file)  # what was written: layout, adapted kwargs, input, sha256
        n_parameters = sum(p.numel() for p in network.parameters())
        card = build_model_card(ckpt, checkpoint_path, run_dir, n_parameters, metadata["sha256"],
                                [Path(d) for d in evaluation_runs])
        card["layout"] = layout
        card["kwargs"] = json.loads(metadata["kwargs"])
        card["input"] = json.loads(metadata["input"])
        (out_dir / MODEL_CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
        (out_dir / MODEL_CARD_MD).write_text(model_card_markdown(card))
    return file
