"""``medcl pretrain``: pretrain a backbone with USCL, SimCLR, MoCo, supervised, FixMatch, Pi-model,
Temporal Ensembling (or MixCL) from a preset.

    medcl pretrain --config configs/uscl.yaml data.manifest=PATH out=DIR [key.sub=value ...] [--resume]

Writes DIR/config.yaml (resolved), DIR/metrics.jsonl and DIR/checkpoints/{last,final}.pt.
A second process on the same DIR is refused at once (exit 2, naming the holder's pid); a run whose
loss or weights become NaN / Inf stops (exit 3) and names the last finite checkpoint.
Multi-GPU: ``torchrun --nproc_per_node=G -m medcl pretrain ...`` (optim.batch_size is global).
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretraining of a backbone (USCL, SimCLR, MoCo, FixMatch, Pi-model, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/uscl.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides, e.g. data.manifest=ingested/ out=runs/uscl optim.epochs=10")
    parser.add_argument("--resume", action="store_true", help="continue DIR/checkpoints/last.pt exactly")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from medcl.config import ConfigError, load_config
    from medcl.train.api import pretrain
    from medcl.cli import user_message
    from medcl.weights import WeightsError
    from medcl.train.trainer import TrainingDiverged, TrainingInterrupted

    try:
        config = load_config(args.config, args.overrides)
        run_dir = pretrain(config, resume=args.resume)
    except (ConfigError, WeightsError, FileExistsError, FileNotFoundError) as exc:
        print(f"medcl pretrain: error: {user_message(exc)}", file=sys.stderr)  # one line, all problems
        return 2
    except TrainingDiverged as exc:
        print(f"medcl pretrain: stopped: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        print(f"medcl pretrain: stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except ValueError as exc:  # data problems found while building (batch larger than the data set, ...)
        print(f"medcl pretrain: error: {user_message(exc)}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"pretraining finished: {run_dir} (backbone in {run_dir / 'checkpoints' / 'final.pt'})")
    return 0
