"""`medcl finetune DATA --init scratch --init RUN/checkpoints/final.pt --out DIR`: cross-validated
fine-tuning with a paired comparison of the initialisations.

--task classify (default): ingested frame sets, stratified group k-fold by patient, repeated
(medcl.evaluate.classify). --task segment: a BUS-BRA folder, an OpenKBP folder (with --organs) or
a CSV manifest (image, mask, patient_id [, fold, split]); UNETR + Dice at several label fractions
(medcl.evaluate.segment)::

    medcl finetune ../shared/data/us-seg/busbra --task segment --size 64,64 \\
        --init scratch --init mixcl=runs/mixcl-2d/checkpoints/final.pt --out runs/seg-busbra

This module only parses arguments; the protocol is the Python API's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out (refused otherwise)")
    parser.add_argument("--config", help="YAML file with fine-tuning settings (flags override it)")
    for name, (flag, typ, help_text) in FIELD_FLAGS.items():
        parser.add_argument(flag, dest=name, type=typ, default=None, help=help_text)
    parser.add_argument("--classes", help="comma-separated classes to keep, in this order (others are dropped)")
    parser.add_argument("--map", action="append", metavar="FROM=TO", help="rename a label before filtering (repeatable)")
    parser.add_argument("--where", action="append", metavar="COLUMN=VALUE",
                        help="keep videos whose --metadata row has this value, e.g. probe=convex (repeatable)")
    parser.add_argument("--augment", action="store_true", default=None,
                        help="classification: augment training frames (disables the feature cache); --task segment: "
                             "the same as --seg-augment monai")
    parser.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                        help="recompute the frozen prefix every step (for benchmarking)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help='also write the curves as TensorBoard scalars under OUT/tb (pip install "medcl[tensorboard]")')
    parser.add_argument("--allow-outside-frames", dest="allow_outside_frames", action="store_true", default=None,
                        help="follow manifest frame paths that lead outside the manifest's folder")
    parser.add_argument("--no-save-models", dest="save_models", action="store_false", default=None,
                        help="do not keep each fold's selected model in OUT/models/ (kept by default, with a model card)")
    parser.add_argument("--final-model", dest="final_model", action="store_true", default=None,
                        help="classification: also train one model on all labeled videos for the median selected "
                             "epoch over folds: OUT/models/final.safetensors (for `medcl predict`)")


def config_from_args(args: argparse.Namespace):
    from medcl.evaluate.classify import FinetuneConfig

    values: dict = {}
    if args.config:
        values.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for name in list(FIELD_FLAGS) + ["augment", "feature_cache", "allow_outside_frames", "save_models", "final_model", "tensorboard"]:
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
    add_segment_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """`--task segment` options (UNETR + Dice on BUS-BRA / OpenKBP / a CSV manifest)."""
    parser.add_argument("--task", choices=["classify", "segment"], default="classify",
                        help="classify (frame/video classes, default) or segment (UNETR + Dice)")
    group = parser.add_argument_group("segmentation (--task segment)")
    group.add_argument("--seg-source", choices=["auto", "busbra", "openkbp", "csv"], default="auto",
                       help="what DATA is (default: detect)")
    group.add_argument("--organs", default=None, help="OpenKBP organs to segment, e.g. Larynx,Esophagus")
    group.add_argument("--test-patients", default=None, help="OpenKBP patients held out as a separate test set")
    group.add_argument("--test-manifest", default=None,
                       help="CSV manifest (image, mask, patient_id) of a separate test set, scored by every fold's model")
    group.add_argument("--fractions", default=None, help="label fractions of the training patients (default 0.05,0.15,0.5,1)")
    group.add_argument("--run-folds", default=None, help="only these 1-based folds, e.g. 1,2")
    group.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations (default 2000; --arch unet: its budget in --epochs)")
    group.add_argument("--size", default=None, help="2D: resize to H,W; 3D: resample volumes to D,H,W")
    group.add_argument("--roi-size", default=None, help="training crop and sliding-window size")
    group.add_argument("--sw-roi-size", dest="sw_roi_size", default=None,
                       help="--arch unet: a bigger sliding-window tile at inference, e.g. 128,128,128 (default --roi-size)")
    group.add_argument("--window", default=None, metavar="LO,HI",
                       help="3D: intensity window in the image's units, e.g. -150,250 (HU, CT; OpenKBP's default);"
                            " without it each volume is clipped to its --percentiles")
    group.add_argument("--percentiles", default=None, metavar="LO,HI",
                       help="3D without --window: clip each volume to these percentiles (default 0.5,99.5; 0,100 = min-max)")
    group.add_argument("--channel", type=int, default=None, metavar="K",
                       help="3D: channel (modality) of 4D images [X, Y, Z, C] to segment from, 0-based")
    group.add_argument("--seg-augment", dest="seg_augment", choices=["flips", "monai"], default=None,
                       help="flips (random in-plane flips; default, except monai for the 2D --arch unet) or monai (in-plane flips, "
                            "small affine, intensity; 2D and 3D)")
    group.add_argument("--binarize", type=int, default=None, metavar="T",
                       help="binary masks: foreground = mask value > T (e.g. 127 for 0/255 masks with JPEG noise); "
                            "without it, mask values the task does not declare are an error")
    group.add_argument("--model", action="append", default=None, metavar="KEY=VALUE",
                       help="UNETR option for scratch runs, e.g. hidden_size=96 (repeatable)")
    group.add_argument("--arch", choices=["unetr", "unet"], default=None,
                       help="unetr (MixCL's ViT encoder, default) or unet (2D or 3D U-Net on the ResNet-18 backbone: scratch, "
                            "USCL / SimCLR / supervised checkpoints, exports, torchvision resnet18 files). Flags left out "
                            "take the measured 2D / 3D U-Net recipe (batch size, lr, augmentation, a budget in epochs: "
                            "medcl.evaluate.segment.UNET_RECIPE / UNET_BUDGET); the run's config.yaml records the values")
    group.add_argument("--min-iterations", dest="min_iterations", type=int, default=None, metavar="N",
                       help="with --epochs: train at least N iterations (small label fractions get more epochs)")
    group.add_argument("--class-weights", dest="class_weights", default=None, metavar="W0,W1,...",
                       help="loss weight per class, background first (e.g. 1,1,2 for a small organ the model would "
                            "otherwise never predict; default all 1)")
    group.add_argument("--postprocess", choices=["auto", "none", "largest_component"], default=None,
                       help="auto (default): a class keeps only its largest connected component when that removes "
                            "islands from some validation prediction without lowering its validation Dice; "
                            "largest_component: every class; none: the raw argmax")
    group.add_argument("--max-validations", dest="max_validations", type=int, default=None, metavar="N",
                       help="with --epochs: validate at most N times (every k epochs instead of every epoch)")
    group.add_argument("--val-every", type=int, default=None,
                       help="iterations between validations (default 100). With --epochs N the budget is N epochs of "
                            "the training cases, validated every epoch; --patience K stops after K validations "
                            "without improvement (default: never)")



def run(args: argparse.Namespace) -> int:
    if args.task == "segment":
        return run_segment(args)
    from medcl.evaluate.classify import finetune

    config = config_from_args(args)
    apply_threads(args)
    result = finetune(args.data, args.init or ["scratch"], config, args.out, overwrite=args.overwrite)
    print_summary(result, args.out)
    return 0


# ------------------------------------------------------------------------------------------ segmentation

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
    return lo, hi  # the order is checked by medcl.evaluate.segment.set_intensity


def apply_intensity_options(task, args: argparse.Namespace) -> None:
    """--window / --percentiles / --channel onto a task (3D only)."""
    from medcl.evaluate.segment import set_intensity

    try:
        set_intensity(task, _pair(getattr(args, "window", None), "--window"),
                      _pair(getattr(args, "percentiles", None), "--percentiles"), getattr(args, "channel", None))
    except ValueError as exc:
        raise SystemExit(f"medcl: {exc}") from None


def segment_config(args: argparse.Namespace):
    """SegmentConfig from --config and the flags (flags win)."""
    from medcl.evaluate.segment import SegmentConfig

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"medcl: config not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        data.update(loaded.get("segment", loaded))
    simple = {"tensorboard": "tensorboard", "seed": "seed", "lr": "lr", "batch_size": "batch_size", "val_fraction": "val_fraction",
              "iterations": "iterations", "folds": "n_folds", "threads": "num_threads", "arch": "arch",
              "epochs": "epochs", "patience": "patience", "val_every": "val_every",
              "min_iterations": "min_iterations", "max_validations": "max_validations", "postprocess": "postprocess"}
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
    if getattr(args, "sw_roi_size", None):
        data["sw_roi_size"] = [int(v) for v in _csv_list(args.sw_roi_size)]
    if getattr(args, "class_weights", None):
        data["class_weights"] = [float(v) for v in _csv_list(args.class_weights)]
    if getattr(args, "model", None):
        data["model"] = {**data.get("model", {}), **_model_kwargs(args.model)}
    if getattr(args, "final_model", None):
        raise SystemExit("medcl finetune --task segment: --final-model applies to classification only; "
                         "each (fold, fraction) model is kept in OUT/models/")
    if getattr(args, "save_models", None) is not None:
        data["save_models"] = args.save_models
    if getattr(args, "seg_augment", None) is not None:
        data["augment"] = args.seg_augment
    elif getattr(args, "augment", None):
        data["augment"] = "monai"
    return SegmentConfig(**data)


def run_segment(args: argparse.Namespace) -> int:
    """`medcl finetune DATA --task segment`: parse, then medcl.evaluate.segment.finetune."""
    from medcl.evaluate.segment import build_task, finetune, results_markdown

    if not args.out:
        raise SystemExit("medcl finetune --task segment: --out is required")
    # bad input (ValueError / OSError, pydantic's included) becomes one line in medcl.cli.main
    config = segment_config(args)
    task = build_task(args.seg_source, args.data, organs=_csv_list(args.organs),
                      test_patients=_csv_list(args.test_patients) or (), classes=_csv_list(args.classes),
                      test_manifest=args.test_manifest, binarize=args.binarize)
    apply_intensity_options(task, args)
    result = finetune(task, args.init or ["scratch"], config, args.out, overwrite=args.overwrite)
    for results in result["runs"].values():
        print(results_markdown(results))
    if result["comparison"] is not None:
        print((Path(args.out) / "comparison.md").read_text())
    print(f"results written to {args.out}")
    return 0
