"""``tiles``: cut a raster area into model-ready PNG tiles plus a GeoPackage of their footprints.

Writes ``OUT/tiles/<tile_id>.png`` (8-bit RGB, exactly N x N) and ``OUT/tiles.gpkg`` (footprints
in the raster CRS with the tile window, GSD and nodata fraction), then prints one summary line.
Each file is written under a temporary name and renamed into place: nothing is half-written.
Exit 0 when every tile was written or skipped for nodata, 1 when tiles failed (the rest are
still written) or no tile could be written at all.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings
import sys
from pathlib import Path
from typing import Sequence

HELP = "Cut a raster area into model-ready 8-bit RGB tiles (PNG) and their footprints (GeoPackage)."
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
                        help="area to tile (default: the whole raster); write "
                        "--extent=-180,-90,180,90 when it starts with a minus")
    parser.add_argument("--extent-crs", metavar="CRS",
                        help="CRS of --extent, e.g. EPSG:4326 (default: the raster's)")
    parser.add_argument("--aoi", metavar="VECTOR_FILE",
                        help="polygons: tiles that do not touch them are skipped")
    parser.add_argument("--tile-size", type=int, default=504, metavar="N",
                        help="tile side in pixels (default 504, GeoChat)")
    parser.add_argument("--overlap", type=float, default=0.1, metavar="F",
                        help="overlap: a fraction of the tile below 1, else pixels (default 0.1)")
    parser.add_argument("--gsd", type=float, metavar="METRES",
                        help="target ground sample distance (default: native)")
    parser.add_argument("--bands", type=_numbers(0, int), metavar="1,2,3",
                        help="one band (grey) or three (R,G,B), 1-based (default: by colour "
                        "interpretation, else 1,2,3)")
    parser.add_argument("--max-nodata", type=float, default=0.95, metavar="F",
                        help="skip tiles with a larger nodata fraction (default 0.95)")
    parser.add_argument("--pixel-space", action="store_true",
                        help="accept a raster without CRS (footprints in its own coordinates)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    from ..core.errors import RasterError
    from ..core.tiling import TileSpec, iter_tiles, plan_tiles

    if not args.verbose:  # one summary line: GDAL's per-block errors are in the failures
        for name in ("rasterio", "pyogrio"):
            logging.getLogger(name).setLevel(logging.WARNING)
    spec = TileSpec(tile_size=args.tile_size, overlap=args.overlap, gsd=args.gsd,
                    bands=args.bands, max_nodata=args.max_nodata)
    plan = plan_tiles(args.raster, spec, extent=args.extent, extent_crs=args.extent_crs,
                      aoi=args.aoi, pixel_space=args.pixel_space)
    out = Path(args.out)
    tiles_dir = out / "tiles"
    written = []
    for tile in iter_tiles(plan):
        tiles_dir.mkdir(parents=True, exist_ok=True)
        _write_png(tiles_dir / f"{tile.tile_id}.png", tile.image)
        written.append(tile)
    if written:
        _write_footprints(out / "tiles.gpkg", written, plan.crs)
    counts = plan.counts
    print(f"{len(written)} tiles written to {tiles_dir}, {counts.skipped_nodata} skipped "
          f"(over {spec.max_nodata:.0%} nodata), {counts.failed} failed")
    for tile_id, reason in counts.failures:
        print(f"failed: {tile_id}: {reason}", file=sys.stderr)
    if not written:
        raise RasterError(
            f"No tile written: all {len(plan)} tiles of {args.raster} are over the nodata limit "
            f"or unreadable. Choose an area with data, or raise --max-nodata."
        )
    return 1 if counts.failed else 0


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


def _write_footprints(path: Path, tiles: Sequence, crs: str | None) -> None:
    """The tiles' footprints with FOOTPRINT_FIELDS as a one-layer GeoPackage."""
    import numpy as np
    import shapely
    from pyogrio import raw

    columns = [np.array([getattr(t, name) for t in tiles]) for name in FOOTPRINT_FIELDS]
    columns[0] = columns[0].astype(object)
    geometry = shapely.to_wkb(np.array([t.footprint for t in tiles], dtype=object), output_dimension=2)
    temp = _temp_path(path)
    try:
        with warnings.catch_warnings():  # no CRS (pixel space) is what was asked for
            warnings.simplefilter("ignore", UserWarning)
            raw.write(str(temp), geometry, columns, list(FOOTPRINT_FIELDS), layer="tiles",
                      driver="GPKG", geometry_type="Polygon", crs=crs)
        os.replace(temp, path)
    finally:
        for leftover in (temp, temp.with_name(temp.name + "-wal"),
                         temp.with_name(temp.name + "-shm")):
            leftover.unlink(missing_ok=True)
