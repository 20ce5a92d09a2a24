"""The headless command line: ``python -m geochat_qgis COMMAND ...``.

Each command lives in its own module of this package with two functions:
``add_arguments(parser)`` and ``run(args) -> int``, plus a one-line ``HELP`` string. Command
modules import heavy libraries inside ``run`` only, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from typing import Optional

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
        command = sub.add_parser(name, help=module.HELP, description=module.HELP,
                                 epilog=getattr(module, "EPILOG", None))
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


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


def os_error_message(exc: OSError, folder: Optional[str | os.PathLike] = None) -> str:
    """A failed file operation in words: which file, what happened, what to do. ``folder``:
    where the command was writing (its free space explains errors that carry no errno, like
    numpy's "4096 requested and 1328 written")."""
    where = f" {exc.filename}" if exc.filename else (f" {folder}" if folder else "")
    code = exc.errno or 0
    if code in (0, errno.ENOSPC, errno.EIO) and folder is not None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 2**20:
                code = errno.ENOSPC
    advice = {
        errno.ENOSPC: "the disk is full: free some space or choose another folder",
        errno.EROFS: "the file system is read-only: choose a folder you can write to",
        errno.EACCES: "permission denied: choose a folder you can write to",
        errno.EPERM: "not permitted: choose a folder you can write to",
        errno.ENOENT: "not found: check the path",
        errno.ENOTDIR: "a part of the path is not a folder: check the path",
        errno.EISDIR: "it is a folder: give a file name",
    }.get(code, f"{exc.strerror or exc}: check the path and the disk")
    return f"cannot use{where}: {advice}"


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
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
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
