"""`medcl finetune DATA --init scratch --init RUN/checkpoints/final.pt --out DIR`: cross-validated
classification fine-tuning (stratified group k-fold by patient, repeated) with a paired comparison
of the initialisations."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

FIELD_FLAGS = {  # config field -> (flag, type, help)
    "protocol": ("--protocol", str, "last_stage (paper: layer4 + linear head), linear (frozen backbone) or full"),
    "epochs": ("--epochs", int, "maximum epochs per fold (default 30)"),
    "batch_size": ("--batch-size", int, "frames per batch (default 64)"),
    "lr": ("--lr", float, "learning rate (default 0.01, the paper's)"),
    "optimizer": ("--optimizer", str, "sgd (momentum 0.9, default) or adam"),
    "weight_decay": ("--weight-decay", float, "default 1e-4"),
    "image_size": ("--image-size", int, "input size in pixels (default 112)"),
    "folds": ("--folds", int, "cross-validation folds (default 5)"),
    "repeats": ("--repeats", int, "repeats with different split seeds (default 3)"),
    "seed": ("--seed", int, "base seed of folds and heads (default 0)"),
    "val_fraction": ("--val-fraction", float, "share of training patients for model selection (default 0.2)"),
    "patience": ("--patience", int, "early stopping: epochs without validation improvement (default 10)"),
    "select_metric": ("--select", str, "validation criterion: loss (default), accuracy, balanced_accuracy, macro_f1"),
    "max_train_frames_per_video": ("--max-train-frames", int, "at most this many training frames per video (0 = all)"),
    "source_contains": ("--source-contains", str, "keep videos whose source path contains this text, e.g. /convex/"),
    "videos_file": ("--videos", str, "text file with the video ids to keep (one per line)"),
    "metadata": ("--metadata", str, "CSV with a 'file' column matching the manifest's source (for --where)"),
    "device": ("--device", str, "cpu (default) or cuda"),
}


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"medcl: {flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `medcl finetune` and `medcl evaluate` (every FinetuneConfig field)."""
    parser.add_argument("--init", action="append", default=None, metavar="SPEC",
                        help="scratch | PATH.pt (medcl checkpoint) | PATH.safetensors | NAME=PATH; repeat to compare "
                             "several on the same folds (the first is the baseline). Default: scratch")
    parser.add_argument("--out", required=False, help="output folder (one run, or one subfolder per --init)")
    parser.add_argument("--config", help="YAML file with fine-tuning settings (flags override it)")
    for name, (flag, typ, help_text) in FIELD_FLAGS.items():
        parser.add_argument(flag, dest=name, type=typ, default=None, help=help_text)
    parser.add_argument("--classes", help="comma-separated classes to keep, in this order (others are dropped)")
    parser.add_argument("--map", action="append", metavar="FROM=TO", help="rename a label before filtering (repeatable)")
    parser.add_argument("--where", action="append", metavar="COLUMN=VALUE",
                        help="keep videos whose --metadata row has this value, e.g. probe=convex (repeatable)")
    parser.add_argument("--augment", action="store_true", default=None, help="augment training frames (disables the feature cache)")
    parser.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                        help="recompute the frozen prefix every step (for benchmarking)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args: argparse.Namespace):
    from medcl.evaluate.classify import FinetuneConfig

    values: dict = {}
    if args.config:
        values.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for name in list(FIELD_FLAGS) + ["augment", "feature_cache"]:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.classes:
        values["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.map:
        values["label_map"] = _pairs(args.map, "--map")
    if args.where:
        values["where"] = _pairs(args.where, "--where")
    try:
        return FinetuneConfig(**values)
    except Exception as exc:  # pydantic names the field and the value
        raise SystemExit(f"medcl: invalid fine-tuning settings: {exc}") from None


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def print_summary(result: dict, out: str | None) -> None:
    for name, res in result["runs"].items():
        s = res["summary"]
        print(f"{name}: video accuracy {s['video']['accuracy']['mean']:.3f} ± {s['video']['accuracy']['std']:.3f}, "
              f"macro-F1 {s['video']['macro_f1']['mean']:.3f}; frame accuracy {s['frame']['accuracy']['mean']:.3f}")
    if result.get("comparison"):
        from medcl.evaluate.compare import comparison_markdown

        print(comparison_markdown(result["comparison"]))
    if out:
        print(f"results written to {out}")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune", help="cross-validated classification fine-tuning on ingested frame sets",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="ingest output folder or its manifest.csv")
    add_config_arguments(parser)
    # `--task segment`: UNETR + Dice on BUS-BRA / OpenKBP / a CSV manifest (medcl.evaluate.segment)
    from medcl.evaluate.segment_cli import add_arguments as add_segment_arguments

    add_segment_arguments(parser, task_default="classify")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if getattr(args, "task", "classify") == "segment":
        from medcl.evaluate.segment_cli import run_cli

        return run_cli(args)
    from medcl.evaluate.classify import finetune

    config = config_from_args(args)
    apply_threads(args)
    result = finetune(args.data, args.init or ["scratch"], config, args.out)
    print_summary(result, args.out)
    return 0
