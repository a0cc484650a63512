"""The `medcl` command line: a thin layer that parses, validates and calls the Python API.

Each subcommand lives in its own module in this package and exposes
``register(subparsers) -> argparse.ArgumentParser`` (which sets ``func`` via ``set_defaults``) and
a ``run(args) -> int`` function returning the exit status. Modules are imported lazily so that
``medcl --help`` stays fast and one broken optional dependency does not take down every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand name -> module in medcl.cli
COMMANDS: dict[str, str] = {
    "synth": "medcl.cli.synth",
    "ingest": "medcl.cli.ingest",
    "pretrain": "medcl.cli.pretrain",
    "finetune": "medcl.cli.finetune",
    "evaluate": "medcl.cli.evaluate",
    "report": "medcl.cli.report",
    "export": "medcl.cli.export",
    "demo": "medcl.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medcl",
        description="Domain-specific contrastive pretraining for medical imaging (USCL, MixCL).",
    )
    from medcl._version import __version__

    parser.add_argument("--version", action="version", version=f"medcl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command not implemented yet: leave it out of --help
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
