"""Model-ready tiles of a raster area, each knowing exactly where it lies on the ground: the plan.

:func:`plan_tiles` lays a grid of square windows over the requested area (cheap: no pixels are
read); core/tile_reading.py's :func:`iter_tiles` then reads them. Edge tiles are shifted inward
to keep their full size; a raster smaller than one tile gets one tile, padded when read.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import shapely
from affine import Affine
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from .errors import RasterError
from .georef import (apply_affine, check_crs, fmt_bounds, ground_pixel_size, reproject_geometry,
                     short_crs, transform_extent)
from .limits import check_tile_count, check_tile_memory
from .raster import band_dtype, is_plain_path, open_raster, resolve_bands
from .tile_types import Tile, TilePlan, TileSpec

log = logging.getLogger(__name__)

DEFAULT_SPEC = TileSpec()  # frozen: safe as a default argument
EPSILON_PX = 1e-6  # pixel edges closer than this to an extent edge count as on it


class MissingCrsError(RasterError):
    """The raster has no CRS (front ends that offer pixel space say how to ask for it)."""


def plan_tiles(raster: Union[str, Path], spec: TileSpec = DEFAULT_SPEC, extent=None,
               extent_crs: Optional[str] = None, aoi: Union[BaseGeometry, str, Path, None] = None,
               pixel_space: bool = False) -> TilePlan:
    """Lay ``spec``'s tiles over ``raster`` within ``extent`` and/or ``aoi``; reads no pixels.

    ``extent`` is (xmin, ymin, xmax, ymax) in ``extent_crs`` (default: the raster CRS), densely
    reprojected. ``aoi`` is a shapely geometry in ``extent_crs`` or a vector file (its own CRS);
    tiles that do not touch it are left out. A raster without CRS is refused unless
    ``pixel_space``: then coordinates are in the raster's own geotransform frame (native
    col/row when it has none) and ``crs`` is None. RasterError on any input that cannot work.
    """
    spec.validate()
    with open_raster(raster) as ds:
        bands = resolve_bands(ds, spec.bands)
        check_tile_memory(spec.tile_size, len(set(bands)), band_dtype(ds, bands))
        crs = ds.crs.to_wkt() if ds.crs else None
        transform, width, height = ds.transform, ds.width, ds.height
        gcps_only = crs is None and bool(ds.gcps[0])
    if gcps_only and not pixel_space:
        raise RasterError(
            f"{raster} is georeferenced by ground control points only: warp it first (QGIS "
            f"Georeferencer, or gdalwarp) so it has a CRS and geotransform, or ask for pixel space."
        )
    if crs is None and not pixel_space:
        raise MissingCrsError(
            f"{raster} has no CRS, so tiles cannot be placed on the map: assign one (in QGIS: "
            f"Layer Properties > Source > Assigned coordinate reference system, then save it "
            f"with Export > Save As; or gdal_edit.py -a_srs EPSG:XXXX {Path(str(raster)).name})."
        )
    if transform.is_degenerate:
        raise RasterError(f"{raster} has a degenerate geotransform: fix its georeferencing.")
    footprint = apply_affine(transform, box(0, 0, width, height))
    area = _requested_area(str(raster), crs, footprint, extent, extent_crs, aoi)
    c0, r0, c1, r1 = _pixel_bounds(area, transform, width, height)

    native_gsd = float(ground_pixel_size(crs, transform, (c0 + c1) / 2, (r0 + r1) / 2)[0])
    window_px = max(1, round(spec.tile_size * (spec.gsd / native_gsd if spec.gsd else 1.0)))
    step_px = max(1, round((spec.tile_size - spec.overlap_px) * window_px / spec.tile_size))
    col_offs = _offsets(c0, c1, window_px, step_px, width)
    row_offs = _offsets(r0, r1, window_px, step_px, height)
    check_tile_count(len(col_offs), len(row_offs), spec.tile_size, window_px, step_px)
    tiles = _make_tiles(col_offs, row_offs, window_px, spec.tile_size, transform, crs,
                        width, height)
    if aoi is not None:
        hits = shapely.intersects(np.array([t.footprint for t in tiles]), area)
        tiles = [t for t, hit in zip(tiles, hits) if hit]
    log.debug("%d tiles of %d native px (step %d) over %s", len(tiles), window_px, step_px, raster)
    return TilePlan(str(raster), spec, crs, tiles, bands, (width, height), transform,
                    (c0, r0, c1 - c0, r1 - r0), area, native_gsd, window_px, step_px)


def _requested_area(raster: str, crs: Optional[str], footprint: BaseGeometry, extent,
                    extent_crs: Optional[str], aoi) -> BaseGeometry:
    """The requested area in the raster CRS, clipped to the raster footprint."""
    if crs is None and extent_crs is not None:
        raise RasterError(
            f"{raster} has no CRS, so an extent in {short_crs(extent_crs)} cannot be placed on "
            f"it: give the extent in the raster's own coordinates (no extent CRS)."
        )
    if extent_crs is not None:
        check_crs(extent_crs, "extent CRS")
    source_crs = extent_crs or crs
    requested = footprint
    if extent is not None:
        xmin, ymin, xmax, ymax = _extent_values(extent)
        if not (xmin < xmax and ymin < ymax):
            raise RasterError(f"Empty extent {fmt_bounds((xmin, ymin, xmax, ymax))}: give "
                              f"xmin < xmax and ymin < ymax.")
        bounds = (xmin, ymin, xmax, ymax)
        if crs is not None:
            bounds = transform_extent(bounds, source_crs, crs)
        requested = box(*bounds)
    if aoi is not None:
        shape, shape_crs = _load_aoi(aoi, source_crs)
        if shape_crs is not None and crs is not None:
            shape = reproject_geometry(shape, shape_crs, crs)
        requested = requested.intersection(shape) if extent is not None else shape
    area = requested.intersection(footprint)
    if area.is_empty or area.area <= 0:
        raise RasterError(
            f"The requested area {fmt_bounds(requested.bounds)} misses the raster "
            f"{fmt_bounds(footprint.bounds)} (both in the raster CRS, {short_crs(crs)}): "
            f"choose an area over the raster, and check the extent's CRS."
        )
    return area


def _extent_values(extent) -> tuple[float, float, float, float]:
    """The four finite numbers of ``extent``; RasterError naming it otherwise."""
    try:
        values = tuple(float(v) for v in extent)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise RasterError(f"The extent {tuple(extent)!r} is not four finite numbers: give "
                          f"xmin, ymin, xmax, ymax as ordinary numbers (no inf or nan).")
    return values  # type: ignore[return-value]


def _load_aoi(aoi, default_crs: Optional[str]) -> tuple[BaseGeometry, Optional[str]]:
    """The AOI as one valid geometry and its CRS; RasterError when it is empty or unreadable.

    The AOI is repaired (a bow-tie becomes two triangles) before its area is measured.
    """
    if isinstance(aoi, BaseGeometry):
        shape, shape_crs, name = aoi, default_crs, "AOI (the polygons given)"
    else:
        shape, shape_crs = _read_vector(str(aoi))
        shape_crs, name = shape_crs or default_crs, f"AOI {aoi}"
    if not shape.is_empty and not shape.is_valid:
        shape = shapely.make_valid(shape)
    if shape.is_empty or shape.area <= 0 or not math.isfinite(shape.area):
        raise RasterError(f"The {name} is empty (no polygon with an area): draw or choose at "
                          f"least one polygon.")
    return shape, shape_crs


def _read_vector(path: str) -> tuple[BaseGeometry, Optional[str]]:
    """Union of every geometry in a vector file, and the file's CRS as WKT."""
    import pyogrio

    if is_plain_path(path) and not Path(path).exists():
        raise RasterError(f"AOI file not found: {path}. Check the path.")
    from pyogrio import errors

    unreadable = (errors.DataSourceError, errors.DataLayerError, errors.FeatureError,
                  errors.GeometryError, errors.FieldError, OSError)
    try:
        meta, _, geometry, _ = pyogrio.raw.read(path, read_geometry=True)
    except unreadable as exc:
        raise RasterError(f"Cannot read the AOI {path} ({exc}): give a vector file "
                          f"(GeoPackage, Shapefile, GeoJSON).") from exc
    geoms = shapely.from_wkb(geometry) if geometry is not None else np.array([])
    geoms = geoms[~shapely.is_missing(geoms)] if len(geoms) else geoms
    shape = shapely.union_all(geoms) if len(geoms) else shapely.Polygon()
    return shape, meta.get("crs")


def _pixel_bounds(area: BaseGeometry, transform: Affine, width: int,
                  height: int) -> tuple[int, int, int, int]:
    """Whole native pixels covering ``area``: col0, row0, col1, row1 (end exclusive)."""
    xmin, ymin, xmax, ymax = apply_affine(~transform, area).bounds
    c0 = max(0, math.floor(xmin + EPSILON_PX))
    r0 = max(0, math.floor(ymin + EPSILON_PX))
    c1 = min(width, math.ceil(xmax - EPSILON_PX))
    r1 = min(height, math.ceil(ymax - EPSILON_PX))
    return c0, r0, max(c1, c0 + 1), max(r1, r0 + 1)


def _offsets(start: int, end: int, window: int, step: int, size: int) -> list[int]:
    """Window origins along one axis covering [start, end) of a raster ``size`` pixels long."""
    if size <= window:
        return [0]  # one window, padded past the raster's end
    length = end - start
    if length <= window:
        return [min(max(0, start + (length - window) // 2), size - window)]
    count = math.ceil((length - window) / step) + 1
    offsets = [start + i * step for i in range(count - 1)] + [end - window]
    return offsets


def _make_tiles(col_offs: list[int], row_offs: list[int], window: int, tile_size: int,
                transform: Affine, crs: Optional[str], width: int, height: int) -> list[Tile]:
    """The grid's tiles with transforms, footprints, GSDs and padding fractions."""
    cols, rows = np.meshgrid(np.array(col_offs), np.array(row_offs))
    cols, rows = cols.ravel(), rows.ravel()
    inside_w = np.minimum(cols + window, width) - cols
    inside_h = np.minimum(rows + window, height) - rows
    gsd = ground_pixel_size(crs, transform, cols + inside_w / 2, rows + inside_h / 2)
    scale = window / tile_size
    corners = np.array([(0, 0), (window, 0), (window, window), (0, window)], dtype=float)
    xs, ys = transform @ (cols[:, None] + corners[None, :, 0], rows[:, None] + corners[None, :, 1])
    footprints = shapely.polygons(np.stack([xs, ys], axis=-1))
    gsd_m = (gsd * scale).tolist()
    # the tile transform is transform @ translation(col_off, row_off) @ scale(scale): built
    # directly, as composing Affine objects costs ~20 us a tile
    a, b, _, d, e, _ = (transform @ Affine.scale(scale))[:6]
    origins_x, origins_y = xs[:, 0].tolist(), ys[:, 0].tolist()
    tiles = []
    for k, (col_off, row_off) in enumerate(zip(cols.tolist(), rows.tolist())):
        row, col = divmod(k, len(col_offs))
        tiles.append(Tile(
            tile_id=f"r{row}_c{col}", row=row, col=col, col_off=col_off, row_off=row_off,
            width=window, height=window,
            transform=Affine(a, b, origins_x[k], d, e, origins_y[k]),
            crs=crs, gsd_m=gsd_m[k], nodata_frac=0.0, footprint=footprints[k],
        ))
    return tiles
