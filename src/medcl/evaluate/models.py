"""Fine-tuned models that travel: the networks fine-tuning trains, kept with a model card and
rebuilt from the file alone.

Every fine-tuning run with an output folder keeps the selected model of each fold (config
``save_models``, on by default)::

    RUN/models/repeat0_fold0.safetensors   classification: one per (repeat, fold)
    RUN/models/fold1_frac100.safetensors   segmentation: one per (fold, label fraction in %)
    RUN/models/final.safetensors           classification with ``final_model``: all labeled videos
    RUN/models/model_card.json             the run's card and the list of its model files
    RUN/models/MODEL_CARD.md               the same for people

Each ``.safetensors`` file is written by :func:`medcl.weights.save_backbone`: the whole model's
state dict, with metadata ``architecture`` (:data:`FRAME_CLASSIFIER`, :data:`UNETR_SEGMENTER` or
:data:`UNET_SEGMENTER`),
``kwargs`` (what rebuilds the network), ``input`` (the :class:`~medcl.inputs.InputSpec`),
``sha256`` and ``card``: JSON with the task, classes, input size and preprocessing, protocol,
initialisation, how this model was selected and its own held-out result, the run's
cross-validation summary with 95% intervals, and the sha256 of the data manifest. A file
therefore travels alone: :func:`load_finetuned` rebuilds the model from it (no pickle; checksum
and finite weights checked by :func:`medcl.weights.read_backbone_file`, kwargs by
:func:`medcl.weights.check_backbone_kwargs`, keys and shapes on the ``meta`` device before
anything is allocated), and ``medcl predict`` takes everything it needs from the card.

These architectures are not backbones, so they stay out of the backbone registry
(:data:`ARCHITECTURES` here). This module also defines the classification network
(:class:`FrameClassifier`) and how a backbone is split per protocol (:func:`split_backbone`).

>>> model, card = load_finetuned("runs/ft/models/final.safetensors")   # doctest: +SKIP
>>> card["classes"], card["input"]["image_size"]                        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from medcl._version import __version__
from medcl.inputs import InputSpec
from medcl.models.backbones import RESNET18_FEATURES, build_backbone
from medcl.weights import (
    MissingWeightsError,
    WeightsError,
    check_backbone_kwargs,
    metadata_json,
    read_backbone_file,
    save_backbone,
)

Protocol = Literal["last_stage", "linear", "full"]

CARD_FORMAT = "medcl-finetuned-v1"
FRAME_CLASSIFIER = "frame_classifier"
UNETR_SEGMENTER = "unetr_segmenter"
UNET_SEGMENTER = "unet_segmenter"
MODELS_DIR = "models"
FINAL_MODEL = "final.safetensors"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"


# --------------------------------------------------------------------------------------------
# the classification network


def split_backbone(backbone: nn.Module, protocol: Protocol) -> tuple[nn.Module, nn.Module]:
    """(frozen prefix, trainable suffix) with ``suffix(prefix(x)) == backbone(x)``.

    ``last_stage``: prefix = stem + layer1..3, suffix = layer4 + pooling (USCL's protocol);
    ``linear``: the whole backbone is the prefix; ``full``: nothing is frozen.
    """
    if protocol == "full":
        return nn.Identity(), backbone
    if protocol == "linear":
        return backbone, nn.Identity()
    if protocol != "last_stage":
        raise ValueError(f"unknown protocol {protocol!r}; choose last_stage, linear or full")
    needed = ["conv1", "bn1", "act", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    missing = [n for n in needed if not hasattr(backbone, n)]
    if missing or getattr(backbone, "fc", None) is not None:
        raise ValueError(f"protocol last_stage needs a ResNet backbone without fc; missing {missing}")
    stem = [backbone.conv1, backbone.bn1, backbone.act]
    if not getattr(backbone, "no_max_pool", False):
        stem.append(backbone.maxpool)
    prefix = nn.Sequential(*stem, backbone.layer1, backbone.layer2, backbone.layer3)
    suffix = nn.Sequential(backbone.layer4, backbone.avgpool, nn.Flatten(1))
    return prefix, suffix


class FrameClassifier(nn.Module):
    """Frozen prefix -> trainable suffix -> linear head. ``forward_features`` starts after the prefix."""

    def __init__(self, prefix: nn.Module, suffix: nn.Module, n_features: int, n_classes: int):
        super().__init__()
        self.prefix, self.suffix = prefix, suffix
        self.head = nn.Linear(n_features, n_classes)
        for p in self.prefix.parameters():
            p.requires_grad_(False)
        self.prefix.eval()  # frozen from the start: nothing may run it with batch statistics

    def train(self, mode: bool = True) -> FrameClassifier:
        super().train(mode)
        self.prefix.eval()  # frozen: BatchNorm statistics stay those of the initialisation
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in list(self.suffix.parameters()) + list(self.head.parameters()) if p.requires_grad]

    def forward_features(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.suffix(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.prefix(x)
        return self.forward_features(h)


class FeatureStandardizer(nn.Module):
    """``(h - mean) / std`` with statistics fitted once on the training frames' features (buffers,
    not trained). The linear protocol needs it: a frozen network's features (above all a random
    one's) have arbitrary per-channel scales, and an unstandardised linear head then learns little
    more than the majority class within a fine-tuning budget, which says nothing about the features."""

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.eps = 1e-5

    @torch.no_grad()
    def fit(self, h: torch.Tensor) -> None:
        h = h.float().flatten(1)
        self.mean.copy_(h.mean(0))
        # sqrt(var + eps) as BatchNorm does: a near-constant (e.g. dead ReLU) channel is not blown
        # up into float rounding noise
        self.std.copy_(torch.sqrt(h.var(0, unbiased=False) + self.eps))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.flatten(1) - self.mean) / self.std


def classifier_parts(backbone: nn.Module, protocol: Protocol) -> tuple[nn.Module, nn.Module]:
    """The (prefix, suffix) of a :class:`FrameClassifier` on ``backbone`` (used, not copied); the
    linear protocol's suffix standardises the frozen features."""
    prefix, suffix = split_backbone(backbone, protocol)
    if protocol == "linear":
        suffix = FeatureStandardizer(RESNET18_FEATURES)
    return prefix, suffix


def frame_classifier(backbone: str = "resnet18", protocol: Protocol = "last_stage", n_classes: int = 2,
                     **backbone_kwargs: Any) -> FrameClassifier:
    """The :data:`FRAME_CLASSIFIER` architecture: registry backbone ``backbone(**backbone_kwargs)``
    split by ``protocol``, with an ``n_classes`` head (random weights: load a state dict)."""
    prefix, suffix = classifier_parts(build_backbone(backbone, **backbone_kwargs), protocol)
    return FrameClassifier(prefix, suffix, RESNET18_FEATURES, n_classes)


def unetr_segmenter(**kwargs: Any) -> nn.Module:
    """The :data:`UNETR_SEGMENTER` architecture: :func:`medcl.models.unetr.build_unetr` with the
    kwargs segmentation fine-tuning built it with."""
    from medcl.models.unetr import build_unetr

    return build_unetr(**kwargs)


def unet_segmenter(**kwargs: Any) -> nn.Module:
    """The :data:`UNET_SEGMENTER` architecture: :func:`medcl.models.unet.build_unet` (a 2D or 3D
    U-Net on the ResNet-18 backbone, its input convention in ``kwargs['input']``). Files saved
    before the decoder widths were recorded used :data:`~medcl.models.unet.LEGACY_DECODER`."""
    from medcl.models.unet import LEGACY_DECODER, build_unet

    if "decoder" not in kwargs and kwargs.get("spatial_dims", 2) == 2:
        kwargs = {**kwargs, "decoder": list(LEGACY_DECODER)}
    return build_unet(**kwargs)


# the fine-tuned networks a model file can name (backbones live in medcl.models.backbones)
ARCHITECTURES = {FRAME_CLASSIFIER: frame_classifier, UNETR_SEGMENTER: unetr_segmenter, UNET_SEGMENTER: unet_segmenter}


# --------------------------------------------------------------------------------------------
# writing and reading model files


def save_finetuned(model: nn.Module, path: str | Path, architecture: str, kwargs: Mapping[str, Any],
                   card: Mapping[str, Any], input_spec: InputSpec) -> Path:
    """Write ``model``'s state dict with ``card`` in the metadata (:func:`medcl.weights.save_backbone`);
    ``kwargs`` rebuild it as ``architecture``. Draws no random numbers."""
    return save_backbone(model.state_dict(), path, architecture, kwargs, _card_metadata(card), input_spec)


def add_to_card(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Rewrite a model file with ``fields`` added to its card (the tensors are read back, checked,
    and written unchanged); returns the new card."""
    tensors, metadata, file = read_backbone_file(path)
    card = {**metadata_json(metadata, "card", file, "{}"), **fields}
    save_backbone(tensors, file, metadata["architecture"], metadata_json(metadata, "kwargs", file, "{}"),
                  _card_metadata(card), InputSpec.from_dict(metadata_json(metadata, "input", file, "null")))
    return card


def _card_metadata(card: Mapping[str, Any]) -> dict[str, str]:
    return {"card": json.dumps(card, sort_keys=False), "task": str(card.get("task")), "medcl_version": __version__}


def resolve_model_file(path: str | Path) -> Path:
    """A model file, or the final model of a folder (``DIR/final.safetensors`` or
    ``DIR/models/final.safetensors``); a folder without one is an error listing its model files."""
    path = Path(path)
    if not path.exists():
        raise MissingWeightsError(f"model file not found: {path}")
    if not path.is_dir():
        return path
    for candidate in (path / FINAL_MODEL, path / MODELS_DIR / FINAL_MODEL):
        if candidate.is_file():
            return candidate
    found = sorted(p.relative_to(path).as_posix() for folder in (path, path / MODELS_DIR)
                   for p in folder.glob("*.safetensors"))
    raise WeightsError(f"{path}: no {FINAL_MODEL} (train one with --final-model); give one of its model files: "
                       + (", ".join(found[:10]) or "none found"))


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on ``device``, its card) from a fine-tuned model file (or a folder with
    a ``final.safetensors``).

    The network is rebuilt from the file's metadata (:data:`ARCHITECTURES`) and its weights are
    loaded strictly; errors (:class:`~medcl.weights.WeightsError`) name the file and the problem,
    including a backbone export given where a fine-tuned model is needed. The card gains
    ``"file"`` (the path read). The caller's random number generators are left as they were.
    """
    tensors, metadata, file = read_backbone_file(resolve_model_file(path))
    architecture = metadata["architecture"]
    if architecture not in ARCHITECTURES or "card" not in metadata:
        raise WeightsError(f"{file}: holds a {architecture!r} backbone (pretraining weights or a `medcl export`), not a "
                           "fine-tuned model; give a file from the models/ folder of a `medcl finetune` run")
    card = metadata_json(metadata, "card", file, "{}")
    kwargs = check_backbone_kwargs(architecture, metadata_json(metadata, "kwargs", file, "{}"), file)
    builder = ARCHITECTURES[architecture]
    try:
        try:
            with torch.device("meta"):  # keys and shapes first, allocating nothing: a file's kwargs are untrusted
                builder(**kwargs).load_state_dict(tensors, strict=True, assign=True)
        except NotImplementedError:  # a builder that computes on its tensors: the strict load below checks
            pass
        with torch.random.fork_rng(devices=[]):  # building draws random initial weights
            model = builder(**kwargs)
        model.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise WeightsError(f"{file}: the weights do not fit {architecture} {kwargs}: "
                           f"{' '.join(str(exc).split())[:600]}") from None
    card["file"] = str(file)
    return model.to(device).eval(), card


# --------------------------------------------------------------------------------------------
# the card


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the data manifest a run was trained on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_mean_std(value: Any) -> bool:
    return isinstance(value, Mapping) and {"mean", "std", "n"} <= set(value)


def ci95(stat: Mapping[str, Any], bounds: tuple[float, float] | None = (0.0, 1.0)) -> list[float] | None:
    """Student-t 95% interval of a mean over folds from ``{mean, std, n}``, clipped to ``bounds``
    (scores live in [0, 1]); None below 2 folds. Folds share training data, so this interval is,
    if anything, too narrow."""
    n, mean, std = stat.get("n") or 0, stat.get("mean"), stat.get("std")
    if n < 2 or mean is None or std is None or math.isnan(mean):
        return None
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    return [max(low, bounds[0]), min(high, bounds[1])] if bounds else [low, high]


def with_intervals(summary: Any, key: str = "") -> Any:
    """A copy of a results summary in which every ``{mean, std, n}`` also holds ``ci95`` (scores
    clipped to [0, 1]; counts, whose keys start with ``n_``, not clipped)."""
    if is_mean_std(summary):
        return {**summary, "ci95": ci95(summary, None if key.startswith("n_") else (0.0, 1.0))}
    if isinstance(summary, Mapping):
        return {k: with_intervals(v, str(k)) for k, v in summary.items()}
    return summary


def _stats(summary: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if is_mean_std(summary):
        yield " / ".join(path), summary
    elif isinstance(summary, Mapping):
        for key, value in summary.items():
            yield from _stats(value, (*path, str(key)))


def _number(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def models_folder(out: str | Path | None, keep: bool) -> Path | None:
    """``out/models`` when a run keeps models there (else None). The model files and cards an
    earlier run left there are removed either way: they would not match this run's results."""
    if out is None:
        return None
    folder = Path(out) / MODELS_DIR
    for path in [*folder.glob("*.safetensors"), folder / CARD_JSON, folder / CARD_MD]:
        path.unlink(missing_ok=True)
    return folder if keep else None


def finish_models(folder: str | Path, card: Mapping[str, Any], models: Sequence[Mapping[str, Any]],
                  summary_of: Any) -> None:
    """Close a run's ``models/`` folder: add to each model file's card its ``cross_validation``
    (``summary_of(model entry)`` with 95% intervals), then write ``model_card.json`` and
    ``MODEL_CARD.md`` listing ``models`` (each ``{"file", "selection", "test", ...}``)."""
    folder = Path(folder)
    for entry in models:
        if (folder / entry["file"]).is_file() and not entry.get("final"):
            add_to_card(folder / entry["file"], cross_validation=with_intervals(summary_of(entry)))
    full = {**card, "cross_validation": with_intervals(card.get("cross_validation")), "models": list(models)}
    (folder / CARD_JSON).write_text(json.dumps(full, indent=1) + "\n")
    (folder / CARD_MD).write_text(card_markdown(full))


def card_markdown(card: Mapping[str, Any]) -> str:
    """MODEL_CARD.md: what the models are, what they take, how well they did, how to use them."""
    inp = card.get("input", {})
    lines = [f"# Fine-tuned {card.get('task')} models: {card.get('init', {}).get('name')} init"
             + (f", protocol {card['protocol']}" if card.get("protocol") else ""), "",
             f"Classes: {', '.join(card.get('classes', []))}" + (" (0 = background)" if card.get("task") == "segment" else ""),
             "", "## Input", ""]
    lines += [f"- {key}: {json.dumps(value)}" for key, value in inp.items()]
    lines += ["", "## How the models were chosen", "", str(card.get("selection", "")), "",
              "## Cross-validation (mean ± std over folds; 95% t-interval of the mean, within [0, 1])", "",
              "| metric | mean ± std | 95% interval | folds |", "|---|---|---|---|"]
    for name, stat in _stats(card.get("cross_validation") or {}):
        interval = stat.get("ci95")
        spread = f" ± {_number(stat['std'])}" if (stat.get("n") or 0) > 1 else ""
        lines.append(f"| {name} | {_number(stat['mean'])}{spread} | "
                     + (f"[{_number(interval[0])}, {_number(interval[1])}]" if interval else "n/a") + f" | {stat['n']} |")
    lines += ["", "Folds share training data, so these intervals are, if anything, too narrow.", "",
              "## Model files", "", "| file | selection | held-out result |", "|---|---|---|"]
    lines += [f"| {m['file']} | {m.get('selection', '')} | {m.get('test', '')} |" for m in card.get("models", [])]
    data = card.get("data", {})
    lines += ["", "## Data", ""] + [f"- {key}: {json.dumps(value)}" for key, value in data.items()]
    example = next((m["file"] for m in card.get("models", []) if m.get("final")), None) or \
        next((m["file"] for m in card.get("models", [])), FINAL_MODEL)
    lines += ["", "## Use", "", "```bash", f"medcl predict models/{example} INPUT... -o predictions/", "```", "",
              "```python", "from medcl.evaluate.models import load_finetuned",
              f"model, card = load_finetuned('models/{example}')  # no pickle: safetensors + JSON metadata", "```",
              "", f"medcl {card.get('medcl_version', __version__)}; card format {card.get('format', CARD_FORMAT)}.", ""]
    return "\n".join(lines)


def base_card(task: str, classes: Sequence[str], input_fields: Mapping[str, Any], init: Mapping[str, Any],
              selection: str, data: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The fields every model card has (a task adds its own through ``extra``)."""
    return {"format": CARD_FORMAT, "task": task, "classes": list(classes), "input": dict(input_fields),
            "init": dict(init), **extra, "selection": selection, "data": dict(data), "medcl_version": __version__}
