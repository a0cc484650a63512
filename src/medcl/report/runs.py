"""Read a run folder into what the report shows. Every piece is optional: absent inputs are None.

Run folders the report understands (any mix of files may be present)::

    DIR/config.yaml             resolved configuration (every run kind)
    DIR/environment.json        optional: python/torch/monai versions and machine of the run
    DIR/metrics.jsonl           pretraining: one JSON object per logged step (step, epoch, lr, loss, ...)
    DIR/checkpoints/final.pt    pretraining checkpoint (or last.pt), medcl-checkpoint-v1
    DIR/backbone.safetensors    an exported backbone (``medcl export``)
    DIR/results.json            fine-tuning: per fold/repeat metrics + summary
    DIR/results.md              fine-tuning: the same as a table for people
    DIR/predictions.csv         fine-tuning: repeat, fold, video_id, frame, true, pred, prob_<class>...
    DIR/curves.jsonl            fine-tuning: repeat, fold, epoch, train_loss, val_metric
    DIR/overlays/*.npz          segmentation: one sample each, arrays ``image`` [H, W] (float or uint8),
                                ``pred`` and ``gt`` [H, W] integer class maps (0 = background),
                                optional ``classes`` (foreground names, class 1..K) or
                                ``class_names`` (index 0 = background); 3D runs store one
                                representative slice (see :func:`write_overlay`)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OVERLAYS_DIR = "overlays"


def write_overlay(
    out_dir: str | Path,
    name: str,
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray,
    class_names: list[str] | None = None,
) -> Path:
    """Save one segmentation sample as ``out_dir/overlays/<name>.npz`` for the report.

    ``image`` [H, W] float (any range; shown min-max scaled) or uint8; ``pred``/``gt`` [H, W]
    integer class maps of the same shape; ``class_names`` the foreground classes 1..K.
    For 3D cases pass the slice to show.
    """
    image, pred, gt = np.asarray(image), np.asarray(pred), np.asarray(gt)
    if image.ndim != 2 or pred.shape != image.shape or gt.shape != image.shape:
        raise ValueError(f"overlay {name!r}: expected image, pred, gt of one [H, W] shape, got {image.shape}, {pred.shape}, {gt.shape}")
    folder = Path(out_dir) / OVERLAYS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"image": image, "pred": pred.astype(np.int16), "gt": gt.astype(np.int16)}
    if class_names is not None:
        arrays["classes"] = np.array([str(c) for c in class_names])
    path = folder / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    return path


@dataclass
class Overlay:
    name: str
    image: np.ndarray
    pred: np.ndarray
    gt: np.ndarray
    class_names: list[str] | None = None


@dataclass
class Run:
    """What one run folder holds; ``notes`` collects files that exist but could not be read."""

    path: Path
    name: str
    config: dict[str, Any] | None = None
    config_text: str | None = None
    environment: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] | None = None
    results_md: str | None = None
    predictions: list[dict[str, str]] = field(default_factory=list)
    checkpoint: Path | None = None
    exported: Path | None = None
    overlays: list[Overlay] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        kinds = []
        if self.metrics or self.checkpoint:
            kinds.append("pretraining")
        if self.is_segmentation:
            kinds.append("segmentation fine-tuning")
        elif self.results or self.predictions or self.curves:
            kinds.append("classification fine-tuning")
        return " + ".join(kinds) or "unknown"

    @property
    def is_segmentation(self) -> bool:
        return bool(self.overlays) or (self.results or {}).get("format") == "medcl-segment-results-v1"

    @property
    def method(self) -> str | None:
        cfg = self.config or {}
        for key in ("method", "init", "pretrained"):
            value = cfg.get(key)
            if isinstance(value, str):
                return value
        return None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    rows = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # a run killed mid-write leaves a torn last line: keep what precedes it
                notes.append(f"{path.name}:{line_no}: not valid JSON, skipped")
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read everything the report can show from a run folder (missing files are simply absent)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    run = Run(path=path, name=name or path.name)
    config_file = path / "config.yaml"
    if config_file.is_file():
        import yaml

        run.config_text = config_file.read_text()
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as exc:
            run.notes.append(f"config.yaml is not valid YAML: {exc}")
    env_file = path / "environment.json"
    if env_file.is_file():
        try:
            run.environment = json.loads(env_file.read_text())
        except json.JSONDecodeError as exc:
            run.notes.append(f"environment.json is not valid JSON: {exc}")
    if run.environment is None and isinstance(run.config, dict) and isinstance(run.config.get("environment"), dict):
        run.environment = run.config["environment"]
    if (path / "metrics.jsonl").is_file():
        run.metrics = _read_jsonl(path / "metrics.jsonl", run.notes)
    if (path / "curves.jsonl").is_file():
        run.curves = _read_jsonl(path / "curves.jsonl", run.notes)
    if (path / "results.json").is_file():
        try:
            loaded = json.loads((path / "results.json").read_text())
            run.results = loaded if isinstance(loaded, dict) else {"results": loaded}
        except json.JSONDecodeError as exc:
            run.notes.append(f"results.json is not valid JSON: {exc}")
    if run.environment is None and isinstance(run.results, dict) and isinstance(run.results.get("environment"), dict):
        run.environment = run.results["environment"]
    if (path / "results.md").is_file():
        run.results_md = (path / "results.md").read_text()
    if (path / "predictions.csv").is_file():
        with (path / "predictions.csv").open(newline="") as handle:
            run.predictions = list(csv.DictReader(handle))
    for candidate in ("final.pt", "last.pt"):
        if (path / "checkpoints" / candidate).is_file():
            run.checkpoint = path / "checkpoints" / candidate
            break
    if (path / "backbone.safetensors").is_file():
        run.exported = path / "backbone.safetensors"
    for file in sorted((path / OVERLAYS_DIR).glob("*.npz")) if (path / OVERLAYS_DIR).is_dir() else []:
        try:
            with np.load(file, allow_pickle=False) as data:
                names = None
                if "class_names" in data.files:  # index 0 = background
                    names = [str(c) for c in data["class_names"]]
                elif "classes" in data.files:  # foreground names only (medcl.evaluate.segment)
                    names = ["background"] + [str(c) for c in np.atleast_1d(data["classes"])]
                overlay = Overlay(file.stem, np.asarray(data["image"]), np.asarray(data["pred"]), np.asarray(data["gt"]), names)
            if overlay.image.ndim != 2 or overlay.pred.shape != overlay.image.shape or overlay.gt.shape != overlay.image.shape:
                raise ValueError(f"shapes image {overlay.image.shape}, pred {overlay.pred.shape}, gt {overlay.gt.shape}")
            run.overlays.append(overlay)
        except Exception as exc:  # noqa: BLE001  (one bad sample must not hide the others)
            run.notes.append(f"{OVERLAYS_DIR}/{file.name} skipped: {exc}")
    return run


def unique_names(paths: list[Path]) -> list[str]:
    """Short display names: the folder name, made unique with the parent when names collide."""
    names = [p.name or str(p) for p in paths]
    duplicated = {name for name in names if names.count(name) > 1}
    names = [f"{p.parent.name}/{name}" if name in duplicated else name for p, name in zip(paths, names)]
    still = {name for name in names if names.count(name) > 1}  # same parent name too: number them
    return [f"{name} ({names[:i].count(name) + 1})" if name in still else name for i, name in enumerate(names)]


def numeric_series(rows: list[dict[str, Any]], x_key: str) -> dict[str, tuple[list[float], list[float]]]:
    """Every numeric column (except the x axis and bookkeeping) as (x, y) lists; NaN/inf dropped."""
    skip = {x_key, "step", "epoch", "repeat", "fold", "time", "elapsed", "wall_time"}
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        x = row.get(x_key)
        if not isinstance(x, (int, float)):
            continue
        for key, value in row.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(float(x))
            ys.append(float(value))
    return series


def stat_cell(value: Any) -> str | None:
    """One table cell: "mean ± std" for a {mean, std, n} statistic (n shown when it is 1), a number, or None."""
    if isinstance(value, dict) and "mean" in value:
        if value.get("mean") is None or (isinstance(value["mean"], float) and np.isnan(value["mean"])):
            return "n/a"
        std = value.get("std")
        cell = f"{value['mean']:.3f} ± {std:.3f}" if isinstance(std, (int, float)) else f"{value['mean']:.3f}"
        return cell + " (n = 1)" if value.get("n") == 1 else cell
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    return None


def flatten_summary(summary: Any, prefix: str = "") -> dict[str, str]:
    """{"metric/sub": "mean ± std"} for every leaf statistic of a results summary."""
    out: dict[str, str] = {}
    if not isinstance(summary, dict):
        return out
    for key, value in summary.items():
        path = f"{prefix}{key}"
        cell = stat_cell(value)
        if cell is not None:
            out[path] = cell
        elif isinstance(value, dict):
            out.update(flatten_summary(value, f"{path} / "))
    return out
