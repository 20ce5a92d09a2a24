"""The headless command line: ``python -m geochat_qgis COMMAND ...``.

Each command lives in its own module of this package with two functions:
``add_arguments(parser)`` and ``run(args) -> int``, plus a one-line ``HELP`` string. Command
modules import heavy libraries inside ``run`` only, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from ..__about__ import version
from ..core.errors import GeoChatError

# command name -> module in this package
COMMANDS: dict[str, str] = {
    "tiles": "tiles",
    "parse": "parse",
    "detect": "detect",
    "ask": "ask",
    "make-tiny-model": "tiny_model",
    "convert": "convert",
    "models": "models",
    "deps": "deps",
    "runtime": "runtime",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available command."""
    parser = argparse.ArgumentParser(
        prog="python -m geochat_qgis",
        description="GeoChat for QGIS, headless: tile rasters, run vision-language models, "
        "export detections.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module_name}":
                continue  # command not built yet
            raise
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except GeoChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
