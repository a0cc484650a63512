"""One self-contained HTML report comparing run folders side by side.

Sections (each skipped with a one-line note when its inputs are absent; a section that fails
shows its error instead of stopping the report):

1. Runs: what each folder holds.
2. Training curves: every logged loss term (and lr) vs step, runs overlaid; fine-tuning curves.
3. Cross-validation results: mean ± std tables from results.json, the paired comparison
   (``comparison.md`` beside fine-tuning runs), each run's results.md.
4. Confusion matrices: from predictions.csv (or results.json), pooled over folds and repeats.
5. Grad-CAM: layer4 maps on sample frames per class, one column per run.
6. Feature embedding: t-SNE (PCA for few frames) of backbone features, by class and by video.
7. Segmentation overlays: prediction vs ground truth from DIR/overlays/*.npz.
8. Configuration and environment of each run.

Frames for Grad-CAM and embeddings come from ``manifest`` (an ingest folder or its manifest.csv)
or from the first run whose config names an existing one (``data.manifest``, or ``data`` for a
fine-tuning run). Every image is embedded as base64 PNG: the file has no external assets.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medcl.inputs import InputSpec, resize_frames, to_model_input, unit_range
from medcl.report import plots
from medcl.report.runs import Run, flatten_summary, load_run, numeric_series, stat_cell, unique_names

# Inputs: exactly what each run's training fed its backbone, through the one convention of
# medcl.inputs (resize_frames -> to_model_input with the run's recorded InputSpec).
DEFAULT_SIZE = 112
GRADCAM_MIN_SIZE = 128  # layer4 (stride 32) then has at least a 4x4 grid: smaller inputs give 1x1/2x2 maps
PROTOTYPE_FRAMES_PER_CLASS = 12


@dataclass
class Section:
    anchor: str
    title: str
    body: str = ""
    note: str | None = None  # set when skipped


@dataclass
class ReportContext:
    runs: list[Run]
    manifest: Path | None
    max_embedding_frames: int = 300
    gradcam_per_class: int = 2
    seed: int = 0
    log: Callable[[str], None] = print
    gradcam_min_size: int = GRADCAM_MIN_SIZE
    _frames: Any = None
    _backbones: dict[str, tuple[nn.Module | None, str, InputSpec]] = field(default_factory=dict)
    _features: dict[str, tuple[torch.Tensor, np.ndarray]] = field(default_factory=dict)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def figure(png: bytes, caption: str, max_width: int | None = None) -> str:
    # the width cap sits on the figure: a flex item sizes itself from it, not from the image
    style = f' style="max-width:{max_width}px"' if max_width else ""
    return f'<figure{style}>{img_tag(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def markdown_to_html(text: str, heading_offset: int = 3) -> str:
    """The markdown medcl writes (headings, paragraphs, pipe tables, **bold**, `code`) as HTML."""
    import re

    def inline(s: str) -> str:
        s = esc(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    out: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if not table:
            return
        rows = [r for r in table if not all(set(c.strip()) <= set("-: ") for c in r)]
        head, body = rows[0], rows[1:]
        out.append("<div class='scroll'><table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                   + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body) + "</tbody></table></div>")
        table.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            table.append([c.strip() for c in stripped.strip("|").split("|")])
            continue
        flush_table()
        if not stripped:
            continue
        level = len(stripped) - len(stripped.lstrip("#"))
        if level:
            tag = f"h{min(6, level + heading_offset)}"
            out.append(f"<{tag}>{inline(stripped[level:].strip())}</{tag}>")
        else:
            out.append(f"<p>{inline(stripped)}</p>")
    flush_table()
    return "".join(out)


# --------------------------------------------------------------------------- frames & backbones


def _find_manifest(ctx: ReportContext) -> Path | None:
    from medcl.report.model_card import manifest_path_from_config

    if ctx.manifest is not None:
        return ctx.manifest
    for run in ctx.runs:
        found = manifest_path_from_config(run.config, base=run.path)
        if found is not None:
            return found
    return None


@dataclass
class SampleFrames:
    frames: list[np.ndarray]  # uint8 [H, W]
    labels: list[str]
    videos: list[str]
    frame_index: list[int]
    classes: list[str]


def load_sample_frames(manifest: Path, max_frames: int, seed: int = 0) -> SampleFrames:
    """Evenly spaced frames of the labeled videos (all videos when none is labeled), at most
    ``max_frames`` in total; the video order is shuffled with ``seed`` before capping."""
    from medcl.data.frames import FrameSets

    sets = FrameSets(manifest, cache=False)
    records = [r for r in sets.records if r.label] or list(sets.records)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    per_video = int(np.clip(max_frames // max(1, len(records)), 1, 8))
    frames, labels, videos, index = [], [], [], []
    for i in order:
        record = records[int(i)]
        video_frames = sets.load_frames(record)
        if len(video_frames) == 0:
            continue
        picks = np.unique(np.linspace(0, len(video_frames) - 1, per_video).round().astype(int))
        for j in picks:
            if len(frames) >= max_frames:
                break
            frames.append(video_frames[j])
            labels.append(record.label)
            videos.append(record.video_id)
            index.append(int(j))
    classes = sorted({l for l in labels if l})
    return SampleFrames(frames, labels, videos, index, classes)


def _config_value(config: dict | None, *keys: str) -> Any:
    from medcl.report.model_card import find_in_config

    for key in keys:
        value = find_in_config(config, key)
        if value is not None:
            return value
    return None


def run_input_size(run: Run) -> int:
    size = _config_value(run.config, "data.size", "image_size", "data.image_size")
    return int(size) if isinstance(size, (int, float)) and size >= 16 else DEFAULT_SIZE


def run_backbone(run: Run) -> tuple[nn.Module | None, str, InputSpec]:
    """The run's backbone, where it came from, and the input convention it was trained with
    (``None`` network and the reason when there is none)."""
    from medcl.weights import InitSpec, backbone_from_checkpoint, checkpoint_input, load_init, read_exported

    recorded = (run.config or {}).get("input") or (run.results or {}).get("input")
    if run.exported is not None:
        network, _, _, spec, file = read_exported(run.exported)
        return network, f"exported weights {file.name}", spec
    if run.checkpoint is not None:
        network, ckpt = backbone_from_checkpoint(run.checkpoint)
        return network, f"checkpoint {run.checkpoint.name} (step {ckpt.get('step')})", checkpoint_input(ckpt)
    init = (run.config or {}).get("init")
    if isinstance(init, dict):  # a classification fine-tuning run: its initialisation
        path = init.get("path")
        if path:
            p = Path(path)
            if not p.is_absolute() and not p.exists():
                p = run.path / p
            if not p.exists():
                return None, f"initialisation {path} not found", InputSpec()
            loaded = load_init(InitSpec(str(init.get("name") or p.name), str(p)))
            spec = InputSpec.from_dict(recorded) if recorded else loaded.input
            return loaded.network, f"initialisation {p.name} (pretrained, before fine-tuning)", spec
        if init.get("name") in ("scratch", "random"):
            from medcl.models.backbones import resnet18_backbone

            seed = int(_config_value(run.config, "seed") or 0)
            torch.manual_seed(seed)
            return resnet18_backbone(), f"random initialisation (scratch, seed {seed})", InputSpec.from_dict(recorded)
    return None, "no checkpoint, exported weights or initialisation in this run folder", InputSpec()


def _backbone_cached(ctx: ReportContext, run: Run) -> tuple[nn.Module | None, str, InputSpec]:
    key = str(run.path)
    if key not in ctx._backbones:
        try:
            ctx._backbones[key] = run_backbone(run)
        except Exception as exc:  # noqa: BLE001  (the report goes on without this run's backbone)
            ctx._backbones[key] = (None, f"backbone could not be loaded: {exc}", InputSpec())
    return ctx._backbones[key]


def model_inputs(frames: Sequence[np.ndarray], size: int, spec: InputSpec) -> torch.Tensor:
    """uint8 frames [H, W] -> the tensor the run's backbone saw in training for them (at ``size``)."""
    return to_model_input(resize_frames(frames, size), spec)


def _inputs_and_features(ctx: ReportContext, run: Run, network: nn.Module, frames: SampleFrames) -> tuple[torch.Tensor, np.ndarray]:
    """Model inputs [n, C, S, S] of the sample frames and their features (cached per run)."""
    from medcl.report.gradcam import backbone_features

    key = str(run.path)
    if key not in ctx._features:
        images = model_inputs(frames.frames, run_input_size(run), _backbone_cached(ctx, run)[2])
        ctx._features[key] = (images, backbone_features(network, images))
    return ctx._features[key]


# --------------------------------------------------------------------------- sections


def section_runs(ctx: ReportContext) -> Section:
    rows = []
    for i, run in enumerate(ctx.runs):
        colour = plots.RUN_COLOURS[i % len(plots.RUN_COLOURS)]
        hex_colour = "#%02x%02x%02x" % tuple(int(255 * c) for c in colour[:3])
        present = [
            name
            for name, ok in (
                ("config.yaml", run.config_text is not None), ("metrics.jsonl", bool(run.metrics)),
                ("checkpoint", run.checkpoint is not None), ("backbone.safetensors", run.exported is not None),
                ("results.json", run.results is not None), ("predictions.csv", bool(run.predictions)),
                ("curves.jsonl", bool(run.curves)), (f"{len(run.overlays)} overlays", bool(run.overlays)),
            )
            if ok
        ]
        method = run.method or ""
        init = (run.config or {}).get("init")
        if isinstance(init, dict):
            method = f"fine-tune from {init.get('name')}"
        rows.append(
            f'<tr><td><span class="chip" style="background:{hex_colour}"></span>{esc(run.name)}</td>'
            f"<td>{esc(run.kind)}</td><td>{esc(method)}</td><td><code>{esc(run.path)}</code></td>"
            f"<td>{esc(', '.join(present) or 'nothing readable')}</td></tr>"
        )
        for message in run.notes:
            rows.append(f'<tr><td></td><td colspan="4" class="note">{esc(run.name)}: {esc(message)}</td></tr>')
    body = ("<table><thead><tr><th>run</th><th>kind</th><th>method</th><th>folder</th><th>contents</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    manifest = _find_manifest(ctx)
    body += note(f"Frames for Grad-CAM and embeddings: {manifest}" if manifest else
                 "No data manifest found (pass --manifest): Grad-CAM and embedding sections are skipped.")
    return Section("runs", "Runs", body)


def section_training(ctx: ReportContext) -> Section:
    section = Section("training", "Training curves")
    parts = []
    pretrain = {run.name: numeric_series(run.metrics, "step") for run in ctx.runs if run.metrics}
    pretrain = {k: v for k, v in pretrain.items() if v}
    if pretrain:
        parts.append("<h3>Pretraining: every logged term vs step</h3>")
        terms = sorted({term for series in pretrain.values() for term in series})
        colours = {run.name: plots.RUN_COLOURS[i % len(plots.RUN_COLOURS)] for i, run in enumerate(ctx.runs)}
        parts.append(figure(plots.training_curves(pretrain, colours=colours),
                            f"Logged terms: {', '.join(terms)}. Thick lines: moving average when there are many "
                            "points; faint: raw values."))
    finetune = [run for run in ctx.runs if run.curves]
    if finetune:
        parts.append("<h3>Fine-tuning: per fold</h3><div class='grid'>")
        for run in finetune:
            parts.append(figure(plots.finetune_curves(run.curves, run.name), f"{run.name}: one line per repeat / fold / label fraction", 580))
        parts.append("</div>")
    if not parts:
        section.note = "No metrics.jsonl or curves.jsonl in any run."
    section.body = "".join(parts)
    return section


def section_results(ctx: ReportContext) -> Section:
    section = Section("results", "Cross-validation results")
    runs = [run for run in ctx.runs if run.results is not None and isinstance(run.results.get("summary"), dict)]
    if not runs:
        section.note = "No results.json with a summary in any run."
        return section
    # group by the summary's first level (classification: frame / video; segmentation: label fraction)
    groups: dict[tuple[bool, str], dict[str, dict[str, str]]] = {}
    for run in runs:
        summary = run.results["summary"]
        nested = all(isinstance(v, dict) and stat_cell(v) is None for v in summary.values())
        for group, content in (summary.items() if nested else [("summary", summary)]):
            groups.setdefault((run.is_segmentation, str(group)), {})[run.name] = flatten_summary(content)
    parts = [note("Mean ± standard deviation over test folds (and repeats), as written by the fine-tuning run.")]
    for (segmentation, group), per_run in groups.items():
        columns: list[str] = []
        for cells in per_run.values():
            columns += [c for c in cells if c not in columns]
        main = [c for c in columns if "per_class" not in c]
        per_class = [c for c in columns if "per_class" in c]
        title = group
        if segmentation:
            try:
                title = f"Segmentation, label fraction {float(group) * 100:g}%"
            except ValueError:
                title = f"Segmentation: {group}"
        elif group in ("frame", "video"):
            title = f"Classification, {group} level"
        for label, cols in ((title, main), (f"{title}: per class", per_class)):
            if not cols:
                continue
            head = "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for c in cols)
            body = "".join(
                f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{esc(cells.get(c, '—'))}</td>" for c in cols) + "</tr>"
                for name, cells in per_run.items()
            )
            parts.append(f"<h3>{esc(label)}</h3><div class='scroll'><table><thead><tr><th>run</th>{head}</tr></thead>"
                         f"<tbody>{body}</tbody></table></div>")
    # the paired comparison that `medcl finetune` writes beside several runs started on the same folds
    for path in sorted({run.path.parent / "comparison.md" for run in runs if (run.path.parent / "comparison.md").is_file()}):
        parts.append(f"<div class='comparison'>{markdown_to_html(path.read_text())}"
                     f"<p class='small'>From <code>{esc(path)}</code></p></div>")
    for run in ctx.runs:
        if run.results_md:
            parts.append(f"<details><summary>results.md of {esc(run.name)} (per class, confusion matrices)</summary>"
                         f"{markdown_to_html(run.results_md, 3)}</details>")
    section.body = "".join(parts)
    return section


def confusion_from_run(run: Run) -> list[tuple[str, np.ndarray, list[str]]]:
    """(level, matrix [true, pred], classes) from predictions.csv, else results.json folds."""
    out = []
    classes = list((run.results or {}).get("classes") or [])
    if run.predictions:
        prob_classes = [k[len("prob_"):] for k in run.predictions[0] if k.startswith("prob_")]
        classes = classes or prob_classes or sorted({r["true"] for r in run.predictions} | {r["pred"] for r in run.predictions})
        index = {c: i for i, c in enumerate(classes)}
        levels = {"video": [r for r in run.predictions if str(r.get("frame", "")).strip() == "-1"],
                  "frame": [r for r in run.predictions if str(r.get("frame", "")).strip() != "-1"]}
        for level, rows in levels.items():
            if not rows:
                continue
            matrix = np.zeros((len(classes), len(classes)), dtype=int)
            for row in rows:
                if row.get("true") in index and row.get("pred") in index:
                    matrix[index[row["true"]], index[row["pred"]]] += 1
            out.append((level, matrix, classes))
        return out
    folds = (run.results or {}).get("folds") or []
    for level in ("video", "frame"):
        mats = [np.asarray(f[level]["confusion_matrix"]) for f in folds if isinstance(f.get(level), dict) and "confusion_matrix" in f[level]]
        if mats and classes:
            out.append((level, np.sum(mats, axis=0), classes))
    return out


def section_confusion(ctx: ReportContext) -> Section:
    section = Section("confusion", "Confusion matrices")
    figures = []
    for run in ctx.runs:
        repeats = {r.get("repeat") for r in run.predictions} if run.predictions else set()
        for level, matrix, classes in confusion_from_run(run):
            pooled = f"pooled over folds{' and ' + str(len(repeats)) + ' repeats' if len(repeats) > 1 else ''}"
            figures.append(figure(plots.confusion_matrix_plot(matrix, classes, f"{run.name}: {level} level"),
                                  f"{run.name}, {level} level, {pooled} (n = {int(matrix.sum())})", 460))
    if not figures:
        section.note = "No predictions.csv or per-fold confusion matrices in any run."
        return section
    section.body = note("Rows: true class; columns: predicted. Colour and percentage: fraction of the true class "
                        "(recall on the diagonal). Video level: mean of the frame probabilities.") + \
        f"<div class='grid'>{''.join(figures)}</div>"
    return section


def _frames_or_note(ctx: ReportContext) -> tuple[Any, str | None]:
    if ctx._frames is None:
        manifest = _find_manifest(ctx)
        if manifest is None:
            ctx._frames = (None, "No data manifest (config data.manifest or --manifest): section skipped.")
        else:
            try:
                frames = load_sample_frames(manifest, ctx.max_embedding_frames, ctx.seed)
                ctx._frames = (frames, None) if frames.frames else (None, f"{manifest}: no frames to show.")
            except Exception as exc:  # noqa: BLE001
                ctx._frames = (None, f"Frames could not be read from {manifest}: {exc}")
    return ctx._frames


def _runs_with_backbones(ctx: ReportContext) -> tuple[list[tuple[Run, nn.Module, str]], list[str]]:
    usable, skipped = [], []
    for run in ctx.runs:
        network, source, _ = _backbone_cached(ctx, run)
        if network is None and run.is_segmentation:
            skipped.append(f"{run.name}: segmentation run (its encoder is not a 2D classification backbone)")
        elif network is None:
            skipped.append(f"{run.name}: {source}")
        elif not hasattr(network, "layer4"):
            skipped.append(f"{run.name}: {type(network).__name__} backbone; Grad-CAM and frame embeddings cover "
                           "the 2D ResNet-18 (classification) backbones")
        else:
            usable.append((run, network, source))
    return usable, skipped


def section_gradcam(ctx: ReportContext) -> Section:
    from medcl.report.gradcam import PrototypeClassifier, backbone_features, gradcam_maps

    section = Section("gradcam", "Grad-CAM (last convolutional stage)")
    frames, why = _frames_or_note(ctx)
    if frames is None:
        section.note = why
        return section
    if not frames.classes:
        section.note = "The manifest has no labeled videos: Grad-CAM needs classes. Section skipped."
        return section
    usable, skipped = _runs_with_backbones(ctx)
    # sample frames: per class, frames from distinct videos (the middle one of the sampled frames)
    rng = np.random.default_rng(ctx.seed)
    picks: list[int] = []
    for cls in frames.classes:
        by_video: dict[str, list[int]] = {}
        for i, (label, video) in enumerate(zip(frames.labels, frames.videos)):
            if label == cls:
                by_video.setdefault(video, []).append(i)
        chosen = rng.permutation(sorted(by_video))[: ctx.gradcam_per_class]
        picks += [by_video[v][len(by_video[v]) // 2] for v in chosen]
    # prototypes: up to PROTOTYPE_FRAMES_PER_CLASS sample frames of each class, spread over its videos
    proto_idx: list[int] = []
    for cls in frames.classes:
        members = [j for j, l in enumerate(frames.labels) if l == cls]
        spread = np.unique(np.linspace(0, len(members) - 1, min(len(members), PROTOTYPE_FRAMES_PER_CLASS)).round().astype(int))
        proto_idx += [members[k] for k in spread]
    proto_labels = [frames.labels[i] for i in proto_idx]
    native = max(max(f.shape) for f in frames.frames)
    cam_sizes = {run.name: max(run_input_size(run), ctx.gradcam_min_size) for run, _, _ in usable}
    display_size = max([min(native, 224), *cam_sizes.values()])
    display = unit_range(resize_frames([frames.frames[i] for i in picks], display_size))[:, 0].numpy()
    maps: dict[str, list[np.ndarray]] = {}
    sources = []
    for run, network, source in usable:
        size, cam_size = run_input_size(run), cam_sizes[run.name]
        spec = _backbone_cached(ctx, run)[2]
        images = model_inputs([frames.frames[i] for i in proto_idx + picks], cam_size, spec)
        features = backbone_features(network, images[: len(proto_idx)])
        model = PrototypeClassifier.from_features(network, features, proto_labels, frames.classes)
        class_idx = [frames.classes.index(frames.labels[i]) for i in picks]
        run_maps = gradcam_maps(model, images[len(proto_idx):], class_idx, "backbone.layer4")
        resized = torch.nn.functional.interpolate(torch.as_tensor(run_maps)[:, None], size=(display_size, display_size),
                                                  mode="bilinear", align_corners=False)[:, 0].numpy()
        maps[run.name] = list(resized)
        grid = -(-cam_size // 32)  # layer4 has stride 32
        scaled = f", frames resized from the training size {size} px so that layer4 has a {grid}x{grid} grid" if cam_size != size else ""
        sources.append(f"{run.name}: {source}; Grad-CAM input {cam_size} px (layer4 grid {grid}x{grid}){scaled}")
    if not maps:
        section.note = "No run has a ResNet backbone to explain. " + " ".join(skipped)
        return section
    titles = [f"{frames.labels[i]}\n{frames.videos[i]} #{frames.frame_index[i]}" for i in picks]
    body = [note("Each frame's score is the cosine similarity of its backbone features to its class's mean feature "
                 "(prototype computed on the report's sample frames), so every backbone is explained with the same "
                 "rule; warm colours = regions that raise that score (MONAI GradCAM on layer4)."),
            figure(plots.gradcam_grid(list(display), titles, maps), "Rows: sample frames (class, video, frame); columns: runs.",
                   260 * (1 + len(maps)))]
    body.append("<ul class='small'>" + "".join(f"<li>{esc(s)}</li>" for s in sources + [f"skipped {s}" for s in skipped]) + "</ul>")
    section.body = "".join(body)
    return section


def embed_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """t-SNE (after PCA to 50 dims) when there are enough points, else PCA."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = np.nan_to_num(np.asarray(features, dtype=np.float64))
    n = len(features)
    if n < 3:
        raise ValueError(f"need at least 3 frames for an embedding, got {n}")
    if n < 30:
        return PCA(n_components=2, random_state=seed).fit_transform(features), "PCA"
    reduced = PCA(n_components=min(50, n - 1, features.shape[1]), random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, (n - 1) / 3.0))
    # exact gradients are several times faster than Barnes-Hut for the few hundred points shown here
    method = "exact" if n <= 1000 else "barnes_hut"
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500,
                  method=method).fit_transform(reduced)
    return coords, f"t-SNE (perplexity {perplexity:g})"


def section_embedding(ctx: ReportContext) -> Section:
    section = Section("embedding", "Feature embedding")
    frames, why = _frames_or_note(ctx)
    if frames is None:
        section.note = why
        return section
    usable, skipped = _runs_with_backbones(ctx)
    if not usable:
        section.note = "No run has backbone weights to embed with. " + " ".join(skipped)
        return section
    parts = []
    for run, network, source in usable:
        _, features = _inputs_and_features(ctx, run, network, frames)
        coords, method = embed_2d(features, ctx.seed)
        parts.append(figure(plots.embedding_plot(coords, frames.labels, frames.videos, f"{run.name}: {method}"),
                            f"{run.name}: {len(frames.frames)} frames of {len(set(frames.videos))} videos; {source}", 580))
    body = note("Frames of one video cluster together for any backbone; what matters is whether classes separate "
                "across videos.") + f"<div class='grid'>{''.join(parts)}</div>"
    if skipped:
        body += "<ul class='small'>" + "".join(f"<li>skipped {esc(s)}</li>" for s in skipped) + "</ul>"
    section.body = body
    return section


def section_segmentation(ctx: ReportContext) -> Section:
    section = Section("segmentation", "Segmentation overlays")
    parts = []
    for run in ctx.runs:
        if not run.overlays:
            continue
        parts.append(f"<h3>{esc(run.name)}</h3><div class='grid'>")
        for overlay in run.overlays[:12]:
            parts.append(figure(plots.segmentation_overlay(overlay.image, overlay.pred, overlay.gt, overlay.name, overlay.class_names),
                                f"{run.name}: {overlay.name}", 580))
        parts.append("</div>")
        if len(run.overlays) > 12:
            parts.append(note(f"{len(run.overlays) - 12} more overlays in {run.path / 'overlays'} not shown."))
    if not parts:
        section.note = "No overlays/*.npz in any run (segmentation runs write them)."
        return section
    section.body = note("Filled colour and outline: the class mask; left image, middle ground truth, right prediction.") + "".join(parts)
    return section


def report_environment() -> dict[str, Any]:
    from medcl.environment import collect_environment

    return collect_environment()


def section_config(ctx: ReportContext) -> Section:
    parts = []
    for run in ctx.runs:
        env = run.environment
        env_html = ("<table class='kv'>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in env.items()) + "</table>"
                    if isinstance(env, dict) else note("Environment not recorded by this run (no environment.json)."))
        config = (f"<details><summary>config.yaml ({len(run.config_text.splitlines())} lines)</summary>"
                  f"<pre>{esc(run.config_text)}</pre></details>" if run.config_text else note("No config.yaml."))
        parts.append(f"<h3>{esc(run.name)}</h3>{env_html}{config}")
    gen = report_environment()
    parts.append("<h3>Report generated with</h3><table class='kv'>" +
                 "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in gen.items()) + "</table>")
    return Section("config", "Configuration and environment", "".join(parts))


SECTIONS: list[Callable[[ReportContext], Section]] = [
    section_runs, section_training, section_results, section_confusion,
    section_gradcam, section_embedding, section_segmentation, section_config,
]

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9;line-height:1.45}
header{background:#1f3a5f;color:#fff;padding:22px 40px}
header h1{margin:0 0 6px 0;font-size:26px}
header .runs span{display:inline-block;background:rgba(255,255,255,.15);border-radius:12px;padding:2px 10px;margin:3px 6px 0 0;font-size:14px}
header .meta{opacity:.8;font-size:13px;margin-top:8px}
main{max-width:1320px;margin:0 auto;padding:10px 40px 60px}
nav{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:10px 20px;margin:18px 0}
nav ol{margin:4px 0;columns:2}
nav a{color:#1f3a5f;text-decoration:none}
section{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:6px 24px 18px;margin:18px 0}
h2{border-bottom:2px solid #e4e8ee;padding-bottom:6px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #dde2e8;padding:5px 10px;text-align:left;vertical-align:top}
thead th{background:#eef2f6}
table.kv th{background:#f3f5f8;font-weight:600;width:110px}
.scroll{overflow-x:auto}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:8px 0}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eef0f3}
figcaption{font-size:13px;color:#555;margin-top:4px}
.note{color:#6a4b00;background:#fff7e0;border-left:3px solid #e0b400;padding:4px 10px;font-size:14px}
.small{font-size:13px;color:#444}
.chip{display:inline-block;width:11px;height:11px;border-radius:3px;margin-right:7px}
pre{background:#f3f5f8;padding:10px;overflow-x:auto;font-size:12.5px;max-height:480px}
details{margin:8px 0}
.comparison{border-left:3px solid #1f3a5f;padding:2px 14px;margin:14px 0;background:#f8fafc}
summary{cursor:pointer;font-weight:600}
code{font-size:13px}
"""


def render(ctx: ReportContext, sections: list[Section], title: str) -> str:
    toc = "".join(f'<li><a href="#{s.anchor}">{esc(s.title)}</a>{" (skipped)" if s.note else ""}</li>' for s in sections)
    body = []
    for s in sections:
        content = note(s.note) if s.note else s.body
        body.append(f'<section id="{s.anchor}"><h2>{esc(s.title)}</h2>{content}</section>')
    runs = "".join(f"<span>{esc(run.name)} <small>({esc(run.kind)})</small></span>" for run in ctx.runs)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><div class='runs'>{runs}</div>"
        f"<div class='meta'>Generated {generated} by medcl report</div></header>"
        f"<main><nav><strong>Contents</strong><ol>{toc}</ol></nav>{''.join(body)}</main></body></html>\n"
    )


def write_report(
    run_dirs: Sequence[str | Path],
    out_path: str | Path,
    manifest: str | Path | None = None,
    *,
    title: str | None = None,
    names: Sequence[str] | None = None,
    max_embedding_frames: int = 300,
    gradcam_per_class: int = 2,
    seed: int = 0,
    gradcam_min_size: int = GRADCAM_MIN_SIZE,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Write one self-contained HTML report comparing ``run_dirs`` side by side; returns its path.

    ``names`` labels the runs (default: folder names, made unique with their parent folder).

    >>> write_report(["runs/scratch", "runs/simclr", "runs/uscl"], "report.html", manifest="ingested/")  # doctest: +SKIP

    Sections whose inputs are absent are skipped with a note; a section that fails shows its error.
    Grad-CAM runs at ``max(training input size, gradcam_min_size)`` pixels so that layer4 (stride
    32) has a spatial grid worth looking at.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run folder")
    paths = [Path(p) for p in run_dirs]
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(paths)} distinct labels, one per run folder; got {names}")
    else:
        names = unique_names(paths)
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    if manifest is not None and not Path(manifest).exists():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    ctx = ReportContext(runs, Path(manifest) if manifest is not None else None, max_embedding_frames,
                        gradcam_per_class, seed, log, gradcam_min_size)
    sections = []
    for build in SECTIONS:
        started = time.perf_counter()
        try:
            sections.append(build(ctx))
            log(f"report: {build.__name__.removeprefix('section_')} ({time.perf_counter() - started:.1f} s)")
        except Exception as exc:  # noqa: BLE001  (one broken input must not cost the whole report)
            name = build.__name__.removeprefix("section_")
            detail = traceback.format_exc(limit=3)
            sections.append(Section(name, name.capitalize(), f"{note(f'This section failed: {exc}')}<details><summary>"
                                    f"traceback</summary><pre>{esc(detail)}</pre></details>"))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = render(ctx, sections, title or "medcl report: " + " vs ".join(names))
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out_path)
    return out_path
