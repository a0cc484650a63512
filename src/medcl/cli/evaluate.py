"""`medcl evaluate`: classification on a separate (hidden) test set, cross-validation, or a paired
comparison of existing run folders.

  medcl evaluate --train TRAIN/ --test TEST/ --init scratch --init RUN/checkpoints/final.pt --out DIR
  medcl evaluate DATA/ --init ... --out DIR          (cross-validation, as `medcl finetune`)
  medcl evaluate --compare DIR/scratch DIR/uscl --out DIR   (paired bootstrap over patients)
"""

from __future__ import annotations

import argparse

from medcl.cli.finetune import add_config_arguments, apply_threads, config_from_args, print_summary


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="train on one manifest and test once on another; or compare run folders",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="ingest folder for cross-validation (instead of --train/--test)")
    parser.add_argument("--train", help="training manifest / ingest folder (validation is carved from it by patient)")
    parser.add_argument("--test", help="test manifest / ingest folder, evaluated once")
    parser.add_argument("--allow-overlap", action="store_true", help="allow videos/patients in both train and test")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="classification run folders (first = baseline)")
    parser.add_argument("--metric", action="append", help="metric(s) for --compare (default accuracy, macro_f1)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for --compare")
    add_config_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.compare:
        from medcl.evaluate.compare import compare_runs, comparison_markdown, write_comparison

        if len(args.compare) < 2:
            raise SystemExit("medcl: --compare needs at least two run folders")
        result = compare_runs(args.compare, metrics=tuple(args.metric or ("accuracy", "macro_f1")),
                              n_boot=args.n_boot, seed=args.seed or 0)
        print(comparison_markdown(result))
        if args.out:
            from medcl.runfolder import refuse_existing

            refuse_existing(args.out, ["comparison.json", "comparison.md"], args.overwrite, "a comparison")
            write_comparison(result, args.out)
            print(f"comparison written to {args.out}")
        return 0
    config = config_from_args(args)
    apply_threads(args)
    inits = args.init or ["scratch"]
    if args.train or args.test:
        if not (args.train and args.test) or args.data:
            raise SystemExit("medcl: give both --train and --test (and no DATA), or DATA alone")
        from medcl.evaluate.classify import evaluate_fixed

        if "repeats" not in config.model_fields_set:  # one fixed split: repeats would only vary the seed
            config = config.model_copy(update={"repeats": 1})
        result = evaluate_fixed(args.train, args.test, inits, config, args.out, allow_overlap=args.allow_overlap,
                                overwrite=args.overwrite)
    elif args.data:
        from medcl.evaluate.classify import finetune

        result = finetune(args.data, inits, config, args.out, overwrite=args.overwrite)
    else:
        raise SystemExit("medcl: give DATA (cross-validation), --train and --test, or --compare RUN_DIR...")
    print_summary(result, args.out)
    return 0
