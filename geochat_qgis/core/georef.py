"""Coordinates between a tile's image pixels, the raster CRS and any other CRS.

Tile pixel coordinates follow GDAL's convention: x right, y down, (0, 0) is the top-left corner
of the top-left pixel and (S, S) the bottom-right corner of a tile of side S, so a GeoChat box
value ``v`` (0-100) is ``v / 100 * S`` pixels. ``Tile.transform`` is the full affine of the image
the model sees (after any resampling), so rotated and sheared rasters need no special case.
Any shapely geometry works: points, boxes, oriented boxes and masks as polygons.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

import numpy as np
import shapely
from affine import Affine
from shapely.affinity import affine_transform
from shapely.geometry.base import BaseGeometry

from .errors import RasterError
from .tile_types import Tile

if TYPE_CHECKING:
    from pyproj import Transformer

# Polygon and line edges are split into this many pieces (at least) before reprojection, so a
# straight edge in one CRS follows its true, curved path in another.
DENSIFY_SEGMENTS = 32
Bounds = tuple[float, float, float, float]


def apply_affine(transform: Affine, geom: BaseGeometry) -> BaseGeometry:
    """``geom`` mapped through ``transform`` (exact, every geometry type)."""
    a, b, c, d, e, f = transform[:6]
    return affine_transform(geom, [a, b, d, e, c, f])


def tile_to_map(tile: Tile, geom: BaseGeometry) -> BaseGeometry:
    """Tile image pixels -> raster CRS coordinates (the raster's own frame in pixel-space mode)."""
    return apply_affine(tile.transform, geom)


def map_to_tile(tile: Tile, geom: BaseGeometry) -> BaseGeometry:
    """Raster CRS coordinates -> tile image pixels."""
    return apply_affine(~tile.transform, geom)


@lru_cache(maxsize=64)
def transformer(src_crs: str, dst_crs: str) -> "Transformer":
    """A cached always_xy pyproj transformer; RasterError if either CRS is unknown."""
    from pyproj import Transformer

    from pyproj.exceptions import CRSError, ProjError

    try:
        return Transformer.from_crs(src_crs, dst_crs, always_xy=True)
    except (CRSError, ProjError) as exc:
        raise RasterError(
            f"Cannot transform coordinates from {short_crs(src_crs)} to {short_crs(dst_crs)}: "
            f"{exc}. Give a CRS pyproj knows (e.g. 'EPSG:4326' or WKT)."
        ) from exc


def short_crs(crs: Optional[str]) -> str:
    """A CRS for messages: its authority code or name, never a page of WKT."""
    if crs is None:
        return "no CRS"
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        parsed = CRS.from_user_input(crs)
    except CRSError:
        return str(crs)[:60]
    authority = parsed.to_authority()
    return f"{authority[0]}:{authority[1]}" if authority else parsed.name


def check_crs(crs: str, what: str = "CRS") -> str:
    """``crs`` if pyproj knows it, else RasterError naming it (``what``: which setting it is)."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError as exc:
        reason = str(exc).rsplit("proj_create:", 1)[-1].strip(" ()")[:120]
        raise RasterError(
            f"The {what} {str(crs)[:60]!r} is not a CRS PROJ knows ({reason}): give one like "
            f"'EPSG:4326' or its WKT."
        ) from None
    return crs


@lru_cache(maxsize=256)
def same_crs(a: Optional[str], b: Optional[str]) -> bool:
    """True when both name the same CRS (or both are None)."""
    if a is None or b is None:
        return a is b
    if a == b:
        return True
    from pyproj import CRS

    return CRS.from_user_input(a) == CRS.from_user_input(b)


def densify(geom: BaseGeometry, segments: int = DENSIFY_SEGMENTS) -> BaseGeometry:
    """``geom`` with extra vertices so that no edge is longer than 1/segments of its extent."""
    if geom.is_empty or geom.geom_type in ("Point", "MultiPoint"):
        return geom
    xmin, ymin, xmax, ymax = geom.bounds
    size = max(xmax - xmin, ymax - ymin)
    if not size > 0:
        return geom
    return shapely.segmentize(geom, size / segments)


def reproject_geometry(geom: BaseGeometry, src_crs: str, dst_crs: str) -> BaseGeometry:
    """``geom`` from ``src_crs`` to ``dst_crs`` (pyproj, always_xy), polygon edges densified.

    Raises RasterError when part of the geometry does not exist in ``dst_crs`` (e.g. a point off
    the visible disc of a geostationary CRS).
    """
    if same_crs(src_crs, dst_crs):
        return geom
    tr = transformer(src_crs, dst_crs)

    def project(coords: np.ndarray) -> np.ndarray:
        x, y = tr.transform(coords[:, 0], coords[:, 1], errcheck=False)
        return np.column_stack([x, y])

    result = shapely.transform(densify(geom), project)
    if not result.is_empty and not np.isfinite(shapely.get_coordinates(result)).all():
        raise RasterError(
            f"Part of the geometry does not exist in {short_crs(dst_crs)} (coordinates off the "
            f"CRS's valid area, e.g. off the disc of a geostationary image): keep the area "
            f"inside what the raster shows."
        )
    return result


def tile_to_crs(tile: Tile, geom: BaseGeometry, dst_crs: str) -> BaseGeometry:
    """Tile image pixels -> ``dst_crs`` (via the raster CRS)."""
    if tile.crs is None:
        raise RasterError(
            f"Tile {tile.tile_id} has no CRS (the raster has none): assign the raster a CRS "
            f"(e.g. in QGIS layer properties or with gdal_edit.py -a_srs) to reproject results."
        )
    return reproject_geometry(tile_to_map(tile, geom), tile.crs, dst_crs)


def transform_extent(bounds: Bounds, src_crs: str, dst_crs: str, samples: int = 21) -> Bounds:
    """Bounds of the extent ``bounds`` (in ``src_crs``) in ``dst_crs``, edges densified.

    When every edge point transforms, this is pyproj's ``transform_bounds`` (which also handles
    poles and the antimeridian). When some do not (the extent reaches off the globe of a
    geostationary CRS), the part that transforms is used: the bounds of a dense grid of sample
    points over the extent that do transform. RasterError when nothing transforms.
    """
    if same_crs(src_crs, dst_crs):
        return tuple(float(v) for v in bounds)  # type: ignore[return-value]
    tr = transformer(src_crs, dst_crs)
    xmin, ymin, xmax, ymax = bounds
    edge = np.linspace(0.0, 1.0, 4 * samples + 1)
    ex = np.concatenate([xmin + edge * (xmax - xmin), np.full_like(edge, xmax),
                         xmax - edge * (xmax - xmin), np.full_like(edge, xmin)])
    ey = np.concatenate([np.full_like(edge, ymin), ymin + edge * (ymax - ymin),
                         np.full_like(edge, ymax), ymax - edge * (ymax - ymin)])
    tx, ty = tr.transform(ex, ey, errcheck=False)
    if np.isfinite(tx).all() and np.isfinite(ty).all():
        out = tr.transform_bounds(xmin, ymin, xmax, ymax, densify_pts=samples)
        if all(math.isfinite(v) for v in out):
            return tuple(float(v) for v in out)  # type: ignore[return-value]
    grid = np.linspace(0.0, 1.0, 8 * samples + 1)
    gx, gy = np.meshgrid(xmin + grid * (xmax - xmin), ymin + grid * (ymax - ymin))
    px, py = tr.transform(np.concatenate([gx.ravel(), ex]), np.concatenate([gy.ravel(), ey]),
                          errcheck=False)
    ok = np.isfinite(px) & np.isfinite(py)
    if not ok.any():
        raise RasterError(
            f"The extent {fmt_bounds(bounds)} in {short_crs(src_crs)} does not exist in "
            f"{short_crs(dst_crs)}: choose an area the raster covers."
        )
    return float(px[ok].min()), float(py[ok].min()), float(px[ok].max()), float(py[ok].max())


def fmt_bounds(bounds: Bounds) -> str:
    """``(xmin, ymin, xmax, ymax)`` with sensible precision for messages."""
    return "(" + ", ".join(f"{v:.6g}" if abs(v) < 1e5 else f"{v:.1f}" for v in bounds) + ")"


# Metres per degree of latitude (mean): the fallback for a geographic CRS where geodesics fail.
METRES_PER_DEGREE = 111_320.0


def ground_pixel_size(crs: Optional[str], transform: Affine, cols, rows) -> np.ndarray:
    """Ground size in metres of one native pixel at pixel positions (cols, rows).

    The geometric mean of the geodesic lengths of the pixel's two sides, measured on the CRS's
    ellipsoid: true metres for projected CRSs with scale distortion (Web Mercator) and for
    geographic CRSs (degrees) at each position's latitude. Where that fails (no CRS, off the
    globe), the nominal pixel size in the CRS's units (metres for projected CRSs).
    """
    cols = np.atleast_1d(np.asarray(cols, dtype=float))
    rows = np.atleast_1d(np.asarray(rows, dtype=float))
    nominal = math.sqrt(abs(transform.determinant))
    if crs is None:
        return np.full(cols.shape, nominal)
    from pyproj import CRS

    parsed = CRS.from_user_input(crs)
    unit = METRES_PER_DEGREE if parsed.is_geographic else (
        parsed.axis_info[0].unit_conversion_factor if parsed.axis_info else 1.0)
    fallback = np.full(cols.shape, nominal * unit)
    geod, geodetic = parsed.get_geod(), parsed.geodetic_crs
    if geod is None or geodetic is None:
        return fallback
    tr = transformer(parsed.to_wkt(), geodetic.to_wkt())
    steps = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    points = [transform @ (cols + dc, rows + dr) for dc, dr in steps]
    lonlat = [tr.transform(x, y, errcheck=False) for x, y in points]
    with np.errstate(invalid="ignore"):
        _, _, dx = geod.inv(*lonlat[0], *lonlat[1])
        _, _, dy = geod.inv(*lonlat[0], *lonlat[2])
        size = np.sqrt(np.asarray(dx) * np.asarray(dy))
    return np.where(np.isfinite(size) & (size > 0), size, fallback)
