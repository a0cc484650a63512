"""`medcl report RUN_DIR [RUN_DIR ...] -o report.html`: one self-contained HTML report."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="write one self-contained HTML report comparing run folders",
        description=(
            "Training curves, cross-validation tables, confusion matrices, Grad-CAM overlays, feature "
            "embeddings, segmentation overlays, config and environment of each run, side by side. "
            "Sections whose inputs are absent are skipped with a note."
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (pretraining, fine-tuning, segmentation)")
    parser.add_argument("-o", "--out", default="report.html", help="output HTML file (default: report.html)")
    parser.add_argument("--manifest", default=None,
                        help="ingest folder (or manifest.csv) with the frames for Grad-CAM and embeddings "
                             "(default: the first run config's data.manifest / data)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--names", default=None, help="comma-separated run labels, one per RUN_DIR (default: folder names)")
    parser.add_argument("--max-frames", type=int, default=300, help="frames embedded per run (default 300)")
    parser.add_argument("--gradcam-per-class", type=int, default=2, help="Grad-CAM sample frames per class (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for frame sampling and t-SNE")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medcl.report.html import write_report

    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        print(f"medcl report: error: run folder(s) not found: {missing}", file=sys.stderr)
        return 2
    try:
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        out = write_report(args.runs, args.out, args.manifest, title=args.title, names=names, max_embedding_frames=args.max_frames,
                           gradcam_per_class=args.gradcam_per_class, seed=args.seed,
                           log=lambda message: print(message, file=sys.stderr))
    except (FileNotFoundError, ValueError) as exc:
        print(f"medcl report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
