"""`medcl predict MODEL INPUT... -o OUT`: a fine-tuned model on new data (medcl.predict).

MODEL: a file from the models/ folder of a `medcl finetune` run (or a folder with a
final.safetensors). Classification takes videos, DICOM cine, images, folders of them or an
ingest folder and writes OUT/videos.csv + OUT/frames.csv; segmentation takes images or NIfTI
volumes and writes OUT/masks/ (in each input's own size, grid and affine) + OUT/volumes.csv.

Exit status: 0 when every input was predicted; 2 when any failed (named in OUT/errors.csv, the
others are predicted anyway), and 2 with one line on stderr when the run could not start (an
input that does not fit the model, a model file that is not a fine-tuned model, OUT already
holding predictions without --overwrite).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict", help="predict with a fine-tuned model (classification or segmentation) on new data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="RUN/models/FILE.safetensors of a fine-tuning run (or a folder with final.safetensors)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders to predict")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace predictions already in OUT")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="frames (classification, default 64) or 2D images (segmentation, default 8) per batch")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="bf16 autocast where the hardware does bf16 natively (auto, as fine-tuning), always or never")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from medcl.predict import predict

    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    summary = predict(args.model, args.inputs, args.out, device=args.device, batch_size=args.batch_size,
                      overwrite=args.overwrite, progress=args.progress, precision=args.precision)
    print(summary.describe())
    return summary.exit_code
