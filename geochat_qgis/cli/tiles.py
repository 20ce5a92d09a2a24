"""``tiles``: cut a raster area into model-ready PNG tiles plus a GeoPackage of their footprints.

Writes ``OUT/tiles/<tile_id>.png`` (8-bit RGB, exactly N x N) and ``OUT/tiles.gpkg`` (footprints
in the raster CRS with the tile window, GSD and nodata fraction), then prints one summary line.
Each file is written under a temporary name and renamed into place: nothing is half-written.
Exit 0 when every tile was written or skipped for nodata, 1 when tiles failed (the rest are
still written) or no tile could be written at all, 130 / 143 after Ctrl-C / SIGTERM (the tiles
written so far keep their footprints).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..core.backends.base import CancelToken
from ..core.errors import Cancelled, ExportError, RasterError
from ..core.tile_reading import iter_tiles
from ..core.tiling import MissingCrsError, TileSpec, plan_tiles
from .argtypes import fraction, non_negative_float, positive_float, positive_int
from .os_errors import os_error_message
from .signals import cancel_on_signals

EPILOG = (
    "Exit status: 0 when every tile was written or skipped for nodata; 1 when a tile failed, "
    "the disk filled up or no tile could be written; 2 for bad arguments; 130 after Ctrl-C and "
    "143 after SIGTERM. The tiles written so far always keep their footprints (tiles.gpkg)."
)
FOOTPRINT_FIELDS = ("tile_id", "row", "col", "col_off", "row_off", "width", "height", "gsd_m",
                    "nodata_frac")


def _numbers(count: int, kind: type):
    """An argparse type: ``count`` comma-separated numbers (any count when 0)."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.replace(" ", "").split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
        if count and len(values) != count:
            raise argparse.ArgumentTypeError(f"give {count} comma-separated numbers, not {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raster", help="raster file or GDAL source string")
    parser.add_argument("--extent", type=_numbers(4, float), metavar="XMIN,YMIN,XMAX,YMAX",
                        help="area to tile (default: the whole raster)")
    parser.add_argument("--extent-crs", metavar="CRS",
                        help="CRS of --extent, e.g. EPSG:4326 (default: the raster's)")
    parser.add_argument("--aoi", metavar="VECTOR_FILE",
                        help="polygons: tiles that do not touch them are skipped")
    parser.add_argument("--tile-size", type=positive_int, default=504, metavar="N",
                        help="tile side in pixels (default 504, GeoChat)")
    parser.add_argument("--overlap", type=non_negative_float, default=0.1, metavar="F",
                        help="overlap: a fraction of the tile below 1, else pixels (default 0.1)")
    parser.add_argument("--gsd", type=positive_float, metavar="METRES",
                        help="target ground sample distance (default: native)")
    parser.add_argument("--bands", type=_numbers(0, int), metavar="1,2,3",
                        help="one band (grey) or three (R,G,B), 1-based (default: by colour "
                        "interpretation, else 1,2,3)")
    parser.add_argument("--max-nodata", type=fraction, default=0.95, metavar="F",
                        help="skip tiles with a larger nodata fraction (default 0.95)")
    parser.add_argument("--pixel-space", action="store_true",
                        help="accept a raster without CRS (footprints in its own coordinates)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    if not args.verbose:  # one summary line: GDAL's per-block errors are in the failures
        for name in ("rasterio", "pyogrio"):
            logging.getLogger(name).setLevel(logging.WARNING)
    spec = TileSpec(tile_size=args.tile_size, overlap=args.overlap, gsd=args.gsd,
                    bands=args.bands, max_nodata=args.max_nodata)
    try:
        plan = plan_tiles(args.raster, spec, extent=args.extent, extent_crs=args.extent_crs,
                          aoi=args.aoi, pixel_space=args.pixel_space)
    except MissingCrsError as exc:
        raise MissingCrsError(f"{exc} Or pass --pixel-space to tile it in its own pixel "
                              f"coordinates.") from None
    out = Path(args.out)
    tiles_dir = out / "tiles"
    _check_folder(tiles_dir)
    cancel = CancelToken()
    written: list[tuple] = []  # footprint rows only: memory does not grow with tile images
    stopped: Optional[str] = None
    with cancel_on_signals(cancel) as interrupts:
        try:
            _write_tiles(plan, tiles_dir, written, cancel)
        except (Cancelled, KeyboardInterrupt):
            stopped = "cancelled"
        except OSError as exc:
            stopped = f"error: {_os_error(exc, tiles_dir)}"
        with interrupts.shield():
            footprints = _finish(out / "tiles.gpkg", written, plan.crs)
    counts = plan.counts
    print(f"{len(written)} tiles written to {tiles_dir}, {counts.skipped_nodata} skipped "
          f"(over {spec.max_nodata:.0%} nodata), {counts.failed} failed")
    for tile_id, reason in counts.failures:
        print(f"failed: {tile_id}: {reason}", file=sys.stderr)
    if stopped:
        print(f"{stopped} (after {len(written)} of {len(plan)} tiles; the PNGs written so far "
              f"and their footprints are kept)", file=sys.stderr)
        return interrupts.exit_status or (130 if stopped == "cancelled" else 1)
    if not written:
        raise RasterError(
            f"No tile written: all {len(plan)} tiles of {args.raster} are over the nodata limit "
            f"or unreadable. Choose an area with data, or raise --max-nodata."
        )
    return 1 if counts.failed or not footprints else 0


def _check_folder(folder: Path) -> None:
    """Check, before any tile is read, that ``folder`` can be created and takes files (probed
    in it, or in its nearest existing parent: nothing is created yet)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    probe = existing / f".geochat-probe-{os.getpid()}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        probe.open("xb").close()
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write tiles to {folder}: {_os_error(exc)}") from None


def _os_error(exc: OSError, folder: Optional[Path] = None) -> str:
    return os_error_message(exc, folder)


def _write_tiles(plan, tiles_dir: Path, written: list[tuple], cancel) -> None:
    """Each tile as a PNG, its footprint row appended to ``written`` once the file is there."""
    for tile in iter_tiles(plan):
        cancel.raise_if_cancelled()
        tiles_dir.mkdir(parents=True, exist_ok=True)
        _write_png(tiles_dir / f"{tile.tile_id}.png", tile.image)
        written.append(tuple(getattr(tile, name) for name in FOOTPRINT_FIELDS)
                       + (tile.footprint,))


def _finish(path: Path, rows: Sequence[tuple], crs: Optional[str]) -> Optional[Path]:
    """The footprints of the tiles written (None when there are none or it cannot be written:
    said on stderr)."""
    if not rows:
        return None
    try:
        _write_footprints(path, rows, crs)
    except OSError as exc:
        print(f"error: the footprints could not be written: {_os_error(exc, path.parent)}",
              file=sys.stderr)
        return None
    return path


def _temp_path(path: Path) -> Path:
    """A hidden name beside ``path`` with the same suffix (drivers pick formats by suffix)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def _write_png(path: Path, image) -> None:
    from PIL import Image

    temp = _temp_path(path)
    try:
        Image.fromarray(image, "RGB").save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _write_footprints(path: Path, rows: Sequence[tuple], crs: str | None) -> None:
    """Footprint rows (FOOTPRINT_FIELDS, then the polygon) as a one-layer GeoPackage; OSError
    when it cannot be written (nothing is left behind then)."""
    import numpy as np
    import shapely
    from pyogrio import raw
    from pyogrio.errors import DataSourceError, FeatureError

    columns = [np.array([row[i] for row in rows]) for i in range(len(FOOTPRINT_FIELDS))]
    columns[0] = columns[0].astype(object)
    geometry = shapely.to_wkb(np.array([row[-1] for row in rows], dtype=object),
                              output_dimension=2)
    temp = _temp_path(path)
    try:
        with warnings.catch_warnings():  # no CRS (pixel space) is what was asked for
            warnings.simplefilter("ignore", UserWarning)
            try:
                raw.write(str(temp), geometry, columns, list(FOOTPRINT_FIELDS), layer="tiles",
                          driver="GPKG", geometry_type="Polygon", crs=crs)
            except (DataSourceError, FeatureError) as exc:  # GDAL's words for a full disk
                raise OSError(errno.ENOSPC if "full" in str(exc) else errno.EIO,
                              str(exc).splitlines()[0][:200], str(path)) from None
        os.replace(temp, path)
    finally:
        for leftover in (temp, temp.with_name(temp.name + "-wal"),
                         temp.with_name(temp.name + "-shm")):
            leftover.unlink(missing_ok=True)
