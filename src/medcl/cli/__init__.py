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
    "predict": "medcl.cli.predict",
    "demo": "medcl.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medcl",
        description="Domain-specific contrastive pretraining for medical imaging (USCL, MixCL).",
    )
    from medcl._version import __version__

    parser.add_argument("--version", action="version", version=f"medcl {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line summary")
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


# What a user can act on (bad files, keys, values, folders, a full disk): one line and exit 2.
# Anything else is a bug in medcl and keeps its traceback.
USER_ERRORS = (ValueError, OSError)
EXIT_BAD_INPUT = 2


def subcommand_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str], bool] | None:
    """``medcl [--debug] COMMAND WORD ...`` where COMMAND's module lists WORD in ``SUBCOMMANDS``
    (e.g. ``medcl ingest merge``, beside ``medcl ingest SRC OUT``): (its parser, the rest, debug)."""
    debug = argv[:1] == ["--debug"]
    rest = argv[1:] if debug else argv
    if len(rest) < 2 or rest[0] not in COMMANDS:
        return None
    builders = getattr(importlib.import_module(COMMANDS[rest[0]]), "SUBCOMMANDS", {})
    if rest[1] not in builders:
        return None
    return builders[rest[1]](), rest[2:], debug


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    routed = subcommand_parser(argv)
    if routed is not None:
        sub_parser, sub_argv, debug = routed
        args = sub_parser.parse_args(sub_argv)
        args.debug = debug
        parser = sub_parser
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except SystemExit as exc:  # a command module refusing its arguments: SystemExit("message")
        if not isinstance(exc.code, str):
            raise
        text = " ".join(exc.code.split())  # one line, also for pydantic's multi-line messages
        message = text if text.startswith("medcl") else f"medcl {args.command}: {text}"
        print(message, file=sys.stderr)
        return EXIT_BAD_INPUT
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"medcl {args.command}: {user_message(exc)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT


def user_message(exc: BaseException) -> str:
    """One line: the message (which names the file or key), never a multi-line dump."""
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}no space left on device"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
