"""`medcl export CHECKPOINT -o DIR [--overwrite]`: backbone weights as safetensors plus a model card.

A DIR that already holds an export is refused (exit 2) unless ``--overwrite``; so are checkpoints
with non-finite weights (a diverged run)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a pretrained backbone as safetensors with a model card",
        description=(
            "Write DIR/backbone.safetensors (keys match the plain MONAI network's state dict; "
            "architecture and kwargs in the metadata), DIR/model_card.json and DIR/MODEL_CARD.md. "
            "Load it back with medcl.load_backbone(DIR)."
        ),
    )
    parser.add_argument("checkpoint", help="a medcl checkpoint (.pt) or a pretraining run folder")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--results", action="append", default=[], metavar="FINETUNE_RUN",
                        help="a fine-tuning run folder (with results.json) to include in the model card; repeatable")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in DIR")
    parser.add_argument("--layout", choices=["torchvision", "monai"], default=None,
                        help="key layout of the weights: torchvision (default for ResNets: loads into torchvision's / "
                             "timm's resnet18 with strict=True, fc left out) or monai")
    parser.add_argument("--in-channels", type=int, default=None, dest="in_channels",
                        help="adapt a ResNet's stem, e.g. 3: a gray image replicated to RGB gives the same features")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from medcl.report.model_card import export_backbone
    from medcl.weights import WeightsError, load_backbone

    try:
        file = export_backbone(args.checkpoint, args.out, args.results, overwrite=args.overwrite, layout=args.layout,
                               in_channels=args.in_channels)
        load_backbone(file)  # proves the export loads before we report success
    except (WeightsError, FileExistsError) as exc:  # FileExistsError: DIR in use or holds an export
        print(f"medcl export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {file} (+ model_card.json, MODEL_CARD.md)")
    return 0
