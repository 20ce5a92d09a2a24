"""The headless command line: ``python -m geochat_qgis COMMAND ...``.

Each command lives in its own module of this package with two functions:
``add_arguments(parser)`` and ``run(args) -> int`` (and an optional ``EPILOG``); its one-line
help is in :data:`COMMANDS`. Only the module of the command being run is imported (none for
``--help``), so each loads just the core it uses; heavy libraries (torch, transformers,
llama_cpp) load inside the core when a model does.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Collection, Sequence
from typing import Optional

from ..__about__ import version
from ..core.errors import GeoChatError
from .os_errors import os_error_message

# command name -> (module in this package, its one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiles": ("tiles", "Cut a raster area into model-ready 8-bit RGB tiles (PNG) and their "
              "footprints (GeoPackage)."),
    "parse": ("parse", "Parse raw model output read on stdin into its text and detections (tile "
              "pixels, x right, y down) and print them as one JSON object."),
    "detect": ("detect", "find objects in a raster with a vision-language model and write them "
               "as vector features"),
    "ask": ("ask", "ask a model a question about a raster extent and print its answer"),
    "make-tiny-model": ("tiny_model", "build a tiny random-weight model: GeoChat (HF folder, GGUF "
                        "pair or GeoChat-style checkpoint) or GeoPixel (its published checkpoint "
                        "layout)"),
    "convert": ("convert", "convert a GeoChat checkpoint to a standard LLaVA folder "
                "(transformers, vLLM) or GGUF (llama.cpp)"),
    "models": ("models", "list, get (download + convert), download, verify, remove or add models"),
    "deps": ("deps", "check or install the Python packages a backend needs (managed environment)"),
    "runtime": ("runtime", "serve the model runtime protocol on stdin/stdout (started by the "
                "plugin, not by hand)"),
}


def build_parser(commands: Optional[Collection[str]] = None) -> argparse.ArgumentParser:
    """The argument parser: every command listed, with the arguments of ``commands`` (None:
    all of them). Only those commands' modules are imported, so ``--help`` and each command
    load only what they need."""
    parser = argparse.ArgumentParser(
        prog="python -m geochat_qgis",
        description="GeoChat for QGIS, headless: tile rasters, run vision-language models, "
        "export detections.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if commands is None or name in commands:
            module = importlib.import_module(f"{__name__}.{module_name}")
            command.epilog = getattr(module, "EPILOG", None)
            module.add_arguments(command)
            command.set_defaults(_run=module.run)
    return parser


def command_in(argv: Sequence[str]) -> list[str]:
    """The command ``argv`` names (its first word that is not an option; the options before it
    take no value), or none."""
    word = next((item for item in argv if not item.startswith("-")), None)
    return [word] if word in COMMANDS else []


# a comma-separated list of numbers that starts with a minus: an option's value, not an option
_NUMBER = r"(?:[\d.]+(?:e[-+]?\d+)?|inf|nan)"
_NEGATIVE_LIST = re.compile(rf"^-{_NUMBER}(?:,\s*[-+]?{_NUMBER}?)+$", re.IGNORECASE)


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--extent -78.9,35.7,-78.6,35.9`` as ``--extent=-78.9,...``: argparse takes a value
    that starts with a minus for an option, so western and southern extents would need ``=``."""
    out: list[str] = []
    for item in argv:
        if (_NEGATIVE_LIST.match(item) and out and out[-1].startswith("--")
                and "=" not in out[-1]):
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def quiet_libraries(verbose: bool) -> None:
    """Our INFO messages, the libraries' warnings only (pyogrio and rasterio log every write
    and open at INFO); everything with ``-v``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("geochat_qgis").setLevel(logging.DEBUG if verbose else logging.INFO)


def use_bundled_proj_data() -> None:
    """Drop PROJ_DATA / PROJ_LIB when they point at another PROJ installation's database and
    rasterio brings its own (QGIS and system shells set them for their PROJ: GDAL inside the
    rasterio wheel then warns on every CRS that the database is from another PROJ)."""
    from importlib.util import find_spec

    spec = find_spec("rasterio")
    if spec is None or not spec.submodule_search_locations:
        return
    bundled = os.path.join(list(spec.submodule_search_locations)[0], "proj_data", "proj.db")
    for name in ("PROJ_DATA", "PROJ_LIB"):
        folder = os.environ.get(name)
        if folder and os.path.isfile(bundled) and _layout(bundled) != _layout(
                os.path.join(folder, "proj.db")):
            logging.getLogger(__name__).debug("ignoring %s=%s (another PROJ's data)", name,
                                              folder)
            del os.environ[name]


def _layout(database: str) -> tuple[str, ...]:
    """DATABASE.LAYOUT.VERSION of a proj.db (empty when it cannot be read)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            rows = connection.execute(
                "SELECT key, value FROM metadata WHERE key LIKE 'DATABASE.LAYOUT.VERSION.%' "
                "ORDER BY key").fetchall()
    except sqlite3.Error:
        return ()
    return tuple(str(value) for _, value in rows)


def internal_error(exc: BaseException, verbose: bool) -> str:
    """The message for a bug: its traceback goes to a file the message names (or to stderr
    with ``-v``), never silently away."""
    text = "".join(traceback.format_exception(exc))
    if verbose:
        sys.stderr.write(text)
        where = "the traceback above"
    else:
        with tempfile.NamedTemporaryFile("w", prefix="geochat-error-", suffix=".txt",
                                         delete=False) as out:
            out.write(text)
        where = f"its traceback, which is in {out.name}"
    return (f"internal error ({type(exc).__name__}: {str(exc)[:200]}): this is a bug; please "
            f"report it with {where}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code (no traceback reaches the user)."""
    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)
    quiet_libraries(args.verbose)
    use_bundled_proj_data()
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
    except OSError as exc:
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: said as one, with its traceback kept in a file
        print(f"error: {internal_error(exc, args.verbose)}", file=sys.stderr)
        return 1
