"""`medcl demo`: the whole pipeline on generated data, in a few minutes on a CPU.

Synthesizes lung-ultrasound-like videos, ingests them, pretrains a ResNet-18 with USCL briefly,
fine-tunes it and a randomly initialised one with 5-fold cross-validation by patient on the same
folds (USCL's last_stage protocol, then a frozen-feature linear probe), prints the paired
comparisons and writes an HTML report. Everything goes under --out.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="end-to-end demo on synthetic videos (a few minutes, no data needed)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="medcl-demo", help="output folder (default ./medcl-demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output of an earlier demo in --out")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (checks the plumbing only)")
    parser.add_argument("--videos", type=int, help="number of synthetic videos (default 45)")
    parser.add_argument("--pretrain-epochs", type=int, help="USCL epochs (default 150 = 300 steps)")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs per fold (default 8)")
    parser.add_argument("--seed", type=int, help="seed of data, pretraining and folds (default 0)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from medcl.demo import DemoSettings, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = DemoSettings.tiny() if args.tiny else DemoSettings()
    for flag, field in (("videos", "n_videos"), ("pretrain_epochs", "pretrain_epochs"),
                        ("finetune_epochs", "finetune_epochs"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            setattr(settings, field, getattr(args, flag))
    try:
        run_demo(args.out, settings, overwrite=args.overwrite, report=not args.no_report)
    except FileExistsError as exc:
        print(f"medcl demo: error: {exc}")
        return 2
    return 0
