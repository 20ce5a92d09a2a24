"""Where a run's results go: the one rule for replacing an existing output.

- A run that processed no tile (all failed, all nodata, stopped before the first) writes
  nothing over an existing file; with no file there, an all-nodata run writes an empty layer
  (the area was looked at and holds nothing), a failed one writes nothing.
- A complete run with processed tiles writes (replaces) the output.
- A partial run (cancelled, interrupted, stopped by an error) writes its finished tiles: to the
  output when there is no file there yet, else beside it as ``NAME-partial-RUNID.EXT``, so an
  existing output is replaced only by a complete, newer one.

One run writes an output at a time: :func:`hold_output` locks ``.NAME.lock`` beside it for the
whole run (released by the system if the process dies), and a second run is refused at once
with the first one's process id.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ExportError
from .export import DRIVERS, export_detections
from .file_lock import FileLock, LockHeld
from .pipeline import JobResult


@dataclass
class Written:
    """What :func:`write_result` did: the file written (None: none) and a sentence about it."""

    path: Optional[Path]
    note: str


def output_exists(path: Path) -> bool:
    """True when ``path`` (or, for a shapefile, any of its parts) is already there."""
    if path.suffix.lower() == ".shp":
        return any(path.with_suffix(s).exists() for s in (".shp", ".shx", ".dbf"))
    return path.exists()


class OutputBusy(ExportError):
    """Another run is writing the same output."""


def hold_output(path: Path) -> FileLock:
    """The output's lock, held: release it (or use it as a ``with`` block) when the run is
    done. OutputBusy at once when another run (another QGIS, the command line) holds it."""
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    try:
        return lock.acquire()
    except LockHeld as exc:
        who = f"another run (pid {exc.pid})" if exc.pid else "another run"
        raise OutputBusy(f"{path} is being written by {who}; pick another output or wait for "
                         "it to finish") from None


def partial_path(path: Path, run_id: str) -> Path:
    """The file beside ``path`` that a partial run writes when ``path`` exists."""
    return path.with_name(f"{path.stem}-partial-{run_id}{path.suffix}")


def write_result(result: JobResult, path: os.PathLike | str, layer: Optional[str] = None,
                 provenance: Optional[Mapping[str, Any]] = None) -> Written:
    """Write ``result``'s detections by the module's rule; ExportError when the write fails
    (nothing is changed then)."""
    path = Path(path)
    exists = output_exists(path)
    if not result.tiles_done:
        if exists:
            return Written(None, f"no tile was processed: {path} was kept as it was")
        if result.complete and not result.failures and result.tiles_skipped:
            return Written(_write(result, path, layer, provenance),
                           "every tile of the area is nodata: the output has no features")
        return Written(None, "no tile was processed: nothing was written")
    if result.complete:
        return Written(_write(result, path, layer, provenance), "")
    how = "cancelled" if result.cancelled else "stopped early"
    if not exists:
        return Written(_write(result, path, layer, provenance),
                       f"{how}: the {result.tiles_done} finished tiles were written")
    beside = partial_path(path, result.run_id)
    return Written(_write(result, beside, layer, provenance),
                   f"{how}: the {result.tiles_done} finished tiles were written to {beside.name}; "
                   f"{path.name} was kept, as only a complete run replaces it")


def _write(result: JobResult, path: Path, layer: Optional[str],
           provenance: Optional[Mapping[str, Any]]) -> Path:
    gpkg = DRIVERS.get(path.suffix.lower()) == "GPKG"
    return export_detections(result.detections, path, result.crs, layer if gpkg else None,
                             provenance={"model": result.model, "run_id": result.run_id,
                                         **(provenance or {})})
