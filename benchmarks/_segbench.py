"""Shared pieces of benchmarks/mixcl_2d.py and mixcl_3d.py: pretrain MixCL variants through the
public API, fine-tune them and scratch with ``medcl.evaluate.segment``, write the markdown report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDCL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def machine() -> str:
    import monai

    from medcl.environment import cpu_model

    return (f"{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__} ({torch.get_num_threads()} threads),"
            f" MONAI {monai.__version__}, Python {platform.python_version()}, {platform.system()}")


def parse_common_args(name: str, description: str, settings: Mapping[str, Mapping[str, Any]],
                      reuse_help: str) -> tuple[argparse.Namespace, dict[str, Any], Path, float]:
    """The options both segmentation benchmarks take; returns (args, settings, work folder, start time)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--reuse-pretraining", action="store_true", help=reuse_help)
    parser.add_argument("--iterations", type=int, default=None, help="override fine-tuning iterations (bigger machines)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override pretraining steps")
    parser.add_argument("--fractions", default=None, help="override the label fractions, e.g. 0.05,0.15")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation rows (scripts that have them)")
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra pretraining config override, e.g. mixcl.alpha=1 (repeatable; needs --tag, and"
                        " the variant's pretraining goes to pretrain-*-TAG/)")
    parser.add_argument("--tag", default="", help="a variant's name: results go to NAME_TAG.md and fine-tunes to"
                        " ft-*-TAG/ (with --reuse-pretraining, the main run's pretraining is reused)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    s = dict(settings["quick" if args.quick else "full"])
    if args.iterations:
        s["iterations"] = args.iterations
    if args.pretrain_steps:
        s["pretrain_steps"] = args.pretrain_steps
    if args.fractions:
        s["fractions"] = sorted(float(v) for v in args.fractions.split(","))
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--tag must be letters, digits, - or _, got {args.tag!r}")
    if args.pretrain_set and not args.tag:
        parser.error("--pretrain-set changes the pretraining: give the variant a --tag")
    s["pretrain_set"] = list(args.pretrain_set)
    _PRETRAIN_SET[:] = args.pretrain_set  # pretrain_mixcl applies them to every pretraining
    work = args.work or ROOT / "benchmarks" / "work" / f"{name}{'_quick' if args.quick else ''}"
    return args, s, work, started


def tagged(name: str, tag: str) -> str:
    """``name`` for the main run, ``name-tag`` for a variant's folder."""
    return f"{name}-{tag}" if tag else name


def pretrain_dir(work: Path, name: str, args: argparse.Namespace) -> Path:
    """A variant that changes pretraining (--pretrain-set) gets its own folder; otherwise the
    main run's folder, so --reuse-pretraining shares it."""
    return work / (tagged(f"pretrain-{name}", args.tag) if args.pretrain_set else f"pretrain-{name}")


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


_PRETRAIN_SET: list[str] = []  # --pretrain-set KEY=VALUE, set by parse_common_args


def check_overrides(resolved: Mapping[str, Any], items: Sequence[str]) -> None:
    """Fail unless every KEY=VALUE reached the resolved config (a variant that silently ran the
    main run's settings would report the main run's numbers under another name)."""
    for item in items:
        key, _, text = item.partition("=")
        node: Any = resolved
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise SystemExit(f"--pretrain-set {item}: no config key {key!r}")
            node = node[part]
        want = yaml.safe_load(text)
        if node != want:
            raise SystemExit(f"--pretrain-set {item}: the resolved config has {key} = {node!r}")


def pretrain_mixcl(config: str | Path, overrides: Sequence[str], out: Path, datasets: list[dict] | None = None,
                   reuse: bool = False) -> dict[str, Any]:
    """Run ``medcl.train.api.pretrain``; returns checkpoint path, seconds and the mean of the
    last 20 logged loss terms."""
    from medcl.config import Config, load_config
    from medcl.train.api import pretrain

    ckpt = out / "checkpoints" / "final.pt"
    t0 = time.time()
    if not (reuse and ckpt.is_file()):
        if out.exists():  # this benchmark's own scratch folder: start afresh
            shutil.rmtree(out)
        cfg = load_config(config, list(overrides) + list(_PRETRAIN_SET) + [f"out={out}"])
        if datasets is not None:
            d = cfg.to_dict()
            d["mixcl"]["datasets"] = datasets
            cfg = Config.from_dict(d)
        check_overrides(cfg.to_dict(), _PRETRAIN_SET)
        pretrain(cfg, out=out)
    seconds = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = rows[-20:]
    keys = [k for k in tail[0] if k.startswith("loss")] if tail else []
    return {"checkpoint": str(ckpt), "seconds": seconds, "steps": rows[-1]["step"] if rows else 0,
            "last_losses": {k: sum(r[k] for r in tail) / len(tail) for k in keys}}


_DATA_CACHE: dict = {}  # decoded images shared by the fine-tunes of one benchmark run


def finetune(task, cfg_values: Mapping[str, Any], checkpoint: str | None, out: Path) -> dict:
    from medcl.evaluate.segment import SegmentConfig, run_segmentation

    t0 = time.time()
    cfg = SegmentConfig(**{**cfg_values, "checkpoint": checkpoint, "save_models": False})  # benchmarks need numbers only
    results = run_segmentation(task, cfg, out, cache=_DATA_CACHE)
    results["seconds"] = time.time() - t0
    return results


def _fraction_table(results_by_init: Mapping[str, dict], columns: Sequence[str], cells) -> str:
    """One row per (label fraction, init): ``cells(summary) -> [formatted cell per column]``."""
    first = next(iter(results_by_init.values()))
    header = ["label fraction", "init", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for frac in first["summary"]:
        for name, res in results_by_init.items():
            s = res["summary"].get(frac)
            if s is not None:
                lines.append("| " + " | ".join([f"{float(frac) * 100:g}%", name, *cells(s)]) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(results_by_init: Mapping[str, dict]) -> str:
    from medcl.evaluate.segment import fmt

    classes = next(iter(results_by_init.values()))["task"]["classes"]
    return _fraction_table(results_by_init, [*classes, "mean"],
                           lambda s: [fmt(s["test_per_class"][c]) for c in classes] + [fmt(s["test_mean_dice"])])


def precision_recall_table(results_by_init: Mapping[str, dict]) -> str:
    """Voxel precision / recall per class (where the runs recorded them); '' otherwise."""
    from medcl.evaluate.segment import fmt

    classes = next(iter(results_by_init.values()))["task"]["classes"]
    if not all("test_precision" in s for r in results_by_init.values() for s in r["summary"].values()):
        return ""
    pairs = [(c, k) for c in classes for k in ("precision", "recall")]
    return _fraction_table(results_by_init, [f"{c} {k}" for c, k in pairs],
                           lambda s: [fmt(s[f"test_{k}"][c]) for c, k in pairs])


def restrict(results: dict, fraction: float) -> dict:
    """The same results with only one label fraction's runs and summary."""
    key = f"{fraction:g}"
    return {**results, "runs": [r for r in results["runs"] if f"{r['fraction']:g}" == key],
            "summary": {key: results["summary"][key]}}


def paired_sentences(results_by_init: Mapping[str, dict], baseline: str, other: str) -> list[str]:
    """Plain statements of the paired per-fold differences (for the discussion)."""
    out = []
    base = {(r["fold"], f"{r['fraction']:g}"): r["test"]["mean_dice"] for r in results_by_init[baseline]["runs"]}
    for frac in results_by_init[other]["summary"]:
        diffs = [r["test"]["mean_dice"] - base[(r["fold"], frac)] for r in results_by_init[other]["runs"]
                 if f"{r['fraction']:g}" == frac and (r["fold"], frac) in base]
        if diffs:
            mean = sum(diffs) / len(diffs)
            better = sum(d > 0 for d in diffs)
            out.append(f"at {float(frac) * 100:g}% labels {other} - {baseline} = {mean:+.3f} Dice on average,"
                       f" {other} better on {better}/{len(diffs)} folds")
    return out


def write_report(path: Path, title: str, intro: str, settings: Mapping[str, Any], pretrain_rows: Mapping[str, dict],
                 main: Mapping[str, dict], ablation: Mapping[str, dict] | None, discussion: str, started: float) -> None:
    from medcl.evaluate.segment import comparison_markdown

    lines = [f"# {title}", "", intro, "",
             f"- command: `{command_line()}`",
             f"- machine: {machine()}",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- wall time: {(time.time() - started) / 60:.1f} min", "",
             "## Settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", "",
             "## Pretraining", "",
             "| variant | steps | minutes | mean of the last 20 logged losses |", "|---|---|---|---|"]
    for name, row in pretrain_rows.items():
        losses = ", ".join(f"{k} {v:.4g}" for k, v in row["last_losses"].items())
        lines.append(f"| {name} | {row['steps']} | {row['seconds'] / 60:.1f} | {losses} |")
    lines += ["", "## Fine-tuning: test Dice on held-out patient folds (mean +- std over folds)", "",
              comparison_markdown(main), "", "Per class:", "", per_class_table(main)]
    pr = precision_recall_table(main)
    if pr:
        lines += ["Voxel precision / recall (overlap / predicted, overlap / true; pooled over each test fold's"
                  " cases, mean +- std over folds):", "", pr]
    if ablation:
        lines += ["## Ablation (same folds, one label fraction)", "", comparison_markdown(ablation)]
    lines += ["", "Fine-tuning minutes per initialisation: "
              + ", ".join(f"{n} {r['seconds'] / 60:.1f}" for n, r in {**main, **(ablation or {})}.items()), "",
              "## Discussion", "", discussion, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def markdown_table_rows(path: Path, header_start: str) -> list[str]:
    """The rows of the first markdown table in ``path`` whose header line starts with
    ``header_start`` (an earlier benchmark's numbers to quote beside new ones); [] if absent."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header_start)), None)
    if start is None:
        return []
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


class Log:
    """print() that also keeps the lines (a benchmark's log goes into its results file)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(msg)


def unet_bench_args(name: str, description: str, argv, extra=None) -> tuple[argparse.Namespace, Path, Path]:
    """The options of segment_2d.py / segment_3d.py; returns (args, work folder, results file)
    and sets the thread count. ``extra(parser)`` adds a script's own options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the whole script in minutes")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help=f"default benchmarks/work/{name}[_quick]")
    parser.add_argument("--folds", default=None, help="folds to run, e.g. 1,2,3,4,5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help=f"default benchmarks/results/{name}[_quick].md")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.fold_list = sorted(int(f) for f in args.folds.split(",")) if args.folds else None
    suffix = "_quick" if args.quick else ""
    torch.set_num_threads(args.threads)
    return (args, args.work or ROOT / "benchmarks" / "work" / f"{name}{suffix}",
            args.out or ROOT / "benchmarks" / "results" / f"{name}{suffix}.md")


def recipe_options(parser: argparse.ArgumentParser) -> None:
    """The U-Net recipe's knobs both segment_2d.py and segment_3d.py take (a longer or otherwise
    different budget than their ``Settings``); :func:`apply_recipe_options` sets them."""
    parser.add_argument("--fractions", default=None, help="label fractions, e.g. 0.05,0.15,1")
    parser.add_argument("--epochs", type=float, default=None, help="epochs of the training patients")
    parser.add_argument("--min-iterations", type=int, default=None, help="at least this many steps per run")
    parser.add_argument("--lr", type=float, default=None)


def apply_recipe_options(args: argparse.Namespace, settings) -> None:
    """Copy the options of :func:`recipe_options` that were given onto a benchmark's ``Settings``."""
    if args.fractions:
        settings.fractions = [float(f) for f in args.fractions.split(",")]
    for key in ("epochs", "min_iterations", "lr"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))


def per_fold_table(results: dict) -> list[str]:
    """One row per (fold, label fraction) of a segmentation run's results: its budget, the selected
    iteration, the post-processing chosen on validation, test Dice per class and their mean (before
    post-processing in brackets)."""
    classes = results["task"]["classes"]
    lines = ["Per fold:", "", "| fold | label fraction | train patients | iterations | best iteration | post-processed | "
             + " | ".join(f"{c} Dice" for c in classes) + " | mean Dice (before post-processing) |",
             "|" + "---|" * (6 + len(classes) + 1)]
    for r in results["runs"]:
        lines.append(f"| {r['fold']} | {r['fraction'] * 100:g}% | {r['n_train_patients']} | {r['iterations']} | "
                     f"{r['best_iteration']} | {', '.join(r['postprocess']['keep_largest_component']) or '-'} | "
                     + " | ".join(f"{r['test']['per_class'][c]:.3f}" for c in classes)
                     + f" | {r['test']['mean_dice']:.3f} ({r['test_raw']['mean_dice']:.3f}) |")
    return lines + [""]


def write_results(path: Path, lines: list[str], log: Log) -> None:
    """The results file: ``lines``, then the run's log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, "## Log", "", "```", *log.lines, "```", ""]))
    print(f"wrote {path}")
