"""Command line of segmentation fine-tuning: ``medcl finetune DATA --task segment ...``.

``DATA`` is a BUS-BRA folder, an OpenKBP folder (with ``--organs``) or a CSV manifest
(``image, mask, patient_id`` [, ``fold``, ``split``]). ``--init`` works as for classification:
``scratch``, a medcl checkpoint (``PATH.pt``, a MixCL ``unetr_encoder``) or ``NAME=PATH``;
repeat it to compare initialisations on the same folds and label fractions (one subfolder of
``--out`` per init plus ``comparison.md``)::

    medcl finetune ../shared/data/us-seg/busbra --task segment --size 64,64 \\
        --init scratch --init mixcl=runs/mixcl-2d/checkpoints/final.pt --out runs/seg-busbra

Kept free of heavy imports: ``medcl finetune`` calls :func:`add_arguments` while building the
parser for ``medcl --help``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _has_dest(parser: argparse.ArgumentParser, dest: str) -> bool:
    return any(a.dest == dest for a in parser._actions)  # noqa: SLF001 - argparse has no public query


def add_arguments(parser: argparse.ArgumentParser, task_default: str = "segment") -> None:
    """Add the segmentation options. Options the host parser already has (``data``, ``--init``,
    ``--out``, ``--config``, ``--folds``, ``--seed``, ``--lr``, ``--batch-size``,
    ``--val-fraction``, ``--classes``, ``--threads`` in ``medcl finetune``) are reused with the
    same meaning. ``medcl finetune`` passes ``task_default="classify"``."""
    shared = [
        ("data", dict(help="BUS-BRA folder, OpenKBP folder or segmentation CSV manifest")),
        ("--init", dict(action="append", default=None, metavar="SPEC",
                        help="scratch | PATH.pt | NAME=PATH (repeat to compare; default scratch)")),
        ("--out", dict(default=None, help="run folder")),
        ("--config", dict(default=None, help="YAML with SegmentConfig fields (optionally under 'segment:')")),
        ("--folds", dict(type=int, default=None, help="folds when the data has no predefined ones (default 5)")),
        ("--seed", dict(type=int, default=None)),
        ("--lr", dict(type=float, default=None)),
        ("--batch-size", dict(type=int, default=None, dest="batch_size")),
        ("--val-fraction", dict(type=float, default=None, dest="val_fraction")),
        ("--classes", dict(default=None, help="CSV manifest: class names for mask values 1..n, comma-separated")),
        ("--threads", dict(type=int, default=None, help="torch CPU threads")),
    ]
    for flag, kw in shared:
        dest = kw.get("dest", flag.lstrip("-").replace("-", "_"))
        if not _has_dest(parser, dest):
            parser.add_argument(flag, **kw)
    if not _has_dest(parser, "task"):
        parser.add_argument("--task", choices=["classify", "segment"], default=task_default,
                            help="classify (frame/video classes) or segment (UNETR + Dice)")
    group = parser.add_argument_group("segmentation (--task segment)")
    group.add_argument("--seg-source", choices=["auto", "busbra", "openkbp", "csv"], default="auto",
                       help="what DATA is (default: detect)")
    group.add_argument("--organs", default=None, help="OpenKBP organs to segment, e.g. Larynx,Esophagus")
    group.add_argument("--test-patients", default=None, help="OpenKBP patients held out as a separate test set")
    group.add_argument("--test-manifest", default=None,
                       help="CSV manifest (image, mask, patient_id) of a separate test set, scored by every fold's model")
    group.add_argument("--fractions", default=None, help="label fractions of the training patients (default 0.05,0.15,0.5,1)")
    group.add_argument("--run-folds", default=None, help="only these 1-based folds, e.g. 1,2")
    group.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations (default 2000)")
    group.add_argument("--size", default=None, help="2D: resize to H,W; 3D: resample volumes to D,H,W")
    group.add_argument("--roi-size", default=None, help="training crop and sliding-window size")
    group.add_argument("--window", default=None, metavar="LO,HI",
                       help="3D: intensity window in the image's units, e.g. -150,250 (HU, CT; OpenKBP's default);"
                            " without it each volume is clipped to its --percentiles")
    group.add_argument("--percentiles", default=None, metavar="LO,HI",
                       help="3D without --window: clip each volume to these percentiles (default 0.5,99.5; 0,100 = min-max)")
    group.add_argument("--channel", type=int, default=None, metavar="K",
                       help="3D: channel (modality) of 4D images [X, Y, Z, C] to segment from, 0-based")
    group.add_argument("--model", action="append", default=None, metavar="KEY=VALUE",
                       help="UNETR option for scratch runs, e.g. hidden_size=96 (repeatable)")


def _csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _model_kwargs(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"medcl: --model expects KEY=VALUE, got {item!r}")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def _pair(text: str | None, flag: str) -> tuple[float, float] | None:
    if not text:
        return None
    parts = _csv_list(text) or []
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise SystemExit(f"medcl: {flag} expects two numbers LO,HI, got {text!r}") from None
    if not lo < hi:
        raise SystemExit(f"medcl: {flag} needs LO < HI, got {text!r}")
    return lo, hi


def apply_intensity_options(task, args: argparse.Namespace) -> None:
    """--window / --percentiles / --channel onto a task (3D only)."""
    window = _pair(getattr(args, "window", None), "--window")
    percentiles = _pair(getattr(args, "percentiles", None), "--percentiles")
    channel = getattr(args, "channel", None)
    if task.spatial_dims != 3 and (window or percentiles or channel is not None):
        raise SystemExit("medcl: --window, --percentiles and --channel apply to 3D volumes only")
    if percentiles is not None:
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise SystemExit(f"medcl: --percentiles must lie in [0, 100], got {list(percentiles)}")
        task.percentiles = percentiles
        task.intensity_range = window  # percentiles asked for: no window unless one is given too
    elif window is not None:
        task.intensity_range = window
    if channel is not None:
        if channel < 0:
            raise SystemExit(f"medcl: --channel must be >= 0, got {channel}")
        task.channel = channel


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """SegmentConfig fields from --config and the flags (flags win)."""
    import yaml

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"medcl: config not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        data.update(loaded.get("segment", loaded))
    simple = {"seed": "seed", "lr": "lr", "batch_size": "batch_size", "val_fraction": "val_fraction",
              "iterations": "iterations", "folds": "n_folds", "threads": "num_threads"}
    for attr, field in simple.items():
        if getattr(args, attr, None) is not None:
            data[field] = getattr(args, attr)
    if getattr(args, "fractions", None):
        data["fractions"] = [float(v) for v in _csv_list(args.fractions)]
    if getattr(args, "run_folds", None):
        data["folds"] = [int(v) for v in _csv_list(args.run_folds)]
    if getattr(args, "size", None):
        data["size"] = [int(v) for v in _csv_list(args.size)]
    if getattr(args, "roi_size", None):
        data["roi_size"] = [int(v) for v in _csv_list(args.roi_size)]
    if getattr(args, "model", None):
        data["model"] = {**data.get("model", {}), **_model_kwargs(args.model)}
    return data


def parse_init(spec: str) -> tuple[str, str | None]:
    """'scratch' -> ('scratch', None); 'NAME=PATH' -> (NAME, PATH); a path -> (its run name, path)."""
    if spec == "scratch":
        return "scratch", None
    name, sep, path = spec.partition("=")
    if sep:
        return name, path
    p = Path(spec)
    if p.stem in ("final", "last") and p.parent.name == "checkpoints":
        return p.parent.parent.name or p.stem, spec
    return p.stem, spec


def attach_test_manifest(task, path: str | Path) -> None:
    """Use every row of a CSV manifest as ``task``'s separate test set (same classes)."""
    from medcl.data.seg_manifest import read_seg_csv

    test = read_seg_csv(path, classes=task.classes, label_map=task.label_map)
    if test.spatial_dims != task.spatial_dims:
        raise ValueError(f"{path}: {test.spatial_dims}D test images for a {task.spatial_dims}D task")
    task.test_cases = test.cases + test.test_cases


def run_cli(args: argparse.Namespace) -> int:
    """Entry point for ``medcl finetune DATA --task segment``."""
    from pydantic import ValidationError

    from medcl.evaluate.segment import SegmentConfig, build_task, comparison_markdown, results_markdown, run_segmentation

    if not getattr(args, "data", None):
        raise SystemExit("medcl finetune --task segment: DATA (folder or CSV manifest) is required")
    if not getattr(args, "out", None):
        raise SystemExit("medcl finetune --task segment: --out is required")
    values = config_values(args)
    inits = [parse_init(s) for s in (getattr(args, "init", None) or ["scratch"])]
    names = [n for n, _ in inits]
    if len(set(names)) != len(names):
        raise SystemExit(f"medcl: --init names must differ, got {names} (use NAME=PATH)")
    try:
        task = build_task(
            args.seg_source, args.data, organs=_csv_list(args.organs),
            test_patients=_csv_list(args.test_patients) or (), classes=_csv_list(getattr(args, "classes", None)),
        )
        if getattr(args, "test_manifest", None):
            attach_test_manifest(task, args.test_manifest)
        apply_intensity_options(task, args)
        configs = [SegmentConfig(**{**values, "checkpoint": path}) for _, path in inits]
    except (ValueError, FileNotFoundError, ValidationError) as exc:
        raise SystemExit(f"medcl finetune --task segment: {exc}") from None
    out = Path(args.out)
    all_results = {}
    for (name, _), cfg in zip(inits, configs):
        run_dir = out if len(inits) == 1 else out / name
        all_results[name] = run_segmentation(task, cfg, run_dir)
        print(results_markdown(all_results[name]))
    if len(inits) > 1:
        table = comparison_markdown(all_results)
        (out / "comparison.md").write_text(f"# {task.name}: initialisations compared\n\n{table}")
        (out / "comparison.json").write_text(json.dumps(
            {n: r["summary"] for n, r in all_results.items()}, indent=2))
        print(table)
    print(f"results written to {out}")
    return 0
