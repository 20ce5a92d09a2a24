"""Model-ready tiles of a raster area, each knowing exactly where it lies on the ground.

:func:`plan_tiles` lays a grid of square windows over the requested area (cheap: no pixels are
read); :func:`iter_tiles` reads them lazily as 8-bit RGB images of exactly ``tile_size`` pixels.
Edge tiles are shifted inward to keep their full size; a raster smaller than one tile is padded
(bottom/right) with the model's pad colour, never stretched. Coarser target GSDs read bigger
windows down to ``tile_size`` with average resampling (GDAL uses overviews where they exist).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import shapely
from affine import Affine
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from .errors import RasterError
from .georef import (apply_affine, check_crs, fmt_bounds, ground_pixel_size, reproject_geometry,
                     short_crs, transform_extent)
from .limits import check_tile_count, check_tile_memory

log = logging.getLogger(__name__)

GEOCHAT_PAD_RGB = (122, 116, 104)  # CLIP mean x 255, truncated: what GeoChat pads with
EPSILON_PX = 1e-6  # pixel edges closer than this to an extent edge count as on it


@dataclass(frozen=True)
class TileSpec:
    """How one model wants its tiles."""

    tile_size: int = 504
    overlap: float = 0.1  # < 1: fraction of tile_size; >= 1: pixels (of the tile image)
    gsd: Optional[float] = None  # target ground sample distance, metres; None = native
    bands: Optional[tuple[int, ...]] = None  # 1-based; None = RGB by colour interp, else 1-3
    max_nodata: float = 0.95  # tiles with a larger nodata fraction are skipped
    pad_rgb: tuple[int, int, int] = GEOCHAT_PAD_RGB  # fill for nodata and padding

    @property
    def overlap_px(self) -> int:
        """Overlap between neighbouring tiles in tile-image pixels."""
        return round(self.overlap * self.tile_size) if self.overlap < 1 else round(self.overlap)

    def validate(self) -> None:
        """RasterError naming the first setting that cannot work."""
        if self.tile_size < 1:
            raise RasterError(f"Tile size must be a positive number of pixels, not {self.tile_size}.")
        if not 0 <= self.overlap_px < self.tile_size:
            raise RasterError(
                f"Overlap {self.overlap} gives {self.overlap_px} px for {self.tile_size} px tiles: "
                f"give a fraction below 1 or fewer pixels than the tile size."
            )
        if self.gsd is not None and not self.gsd > 0:
            raise RasterError(f"Target GSD must be a positive number of metres, not {self.gsd}.")
        if not 0 <= self.max_nodata <= 1:
            raise RasterError(f"max_nodata is a fraction from 0 to 1, not {self.max_nodata}.")
        if len(self.pad_rgb) != 3 or not all(0 <= v <= 255 for v in self.pad_rgb):
            raise RasterError(f"pad_rgb must be three values 0-255, not {self.pad_rgb}.")


@dataclass(slots=True)
class Tile:
    """One square model image and where it lies.

    ``transform`` maps tile image pixels (x right, y down, corners at 0 and tile_size) to raster
    CRS coordinates (the raster's own frame for a raster without CRS, in pixel-space mode).
    The window (``col_off``, ``row_off``, ``width``, ``height``) is in native raster pixels and
    may reach past the raster's right/bottom edge when the raster is smaller than one tile.
    """

    tile_id: str
    row: int
    col: int
    col_off: int
    row_off: int
    width: int
    height: int
    transform: Affine
    crs: Optional[str]  # WKT; None only in pixel-space mode
    gsd_m: float  # ground metres per tile-image pixel at the tile's data centre
    # the share of the tile's raster pixels that hold no data (0 in a plan; padding past the
    # edge of a raster smaller than a tile is not counted: a 1x1 raster is all data)
    nodata_frac: float
    footprint: BaseGeometry  # the whole tile image in raster CRS coordinates
    image: Optional[np.ndarray] = None  # (tile_size, tile_size, 3) uint8 once read
    # (height, width) of the raster's own pixels at the image's top-left when the raster's edge
    # cuts the tile (the rest is padding); None: the whole image is raster
    valid: Optional[tuple[int, int]] = None

    @property
    def window(self):
        """The native-pixel window as a rasterio Window."""
        from rasterio.windows import Window

        return Window(self.col_off, self.row_off, self.width, self.height)


@dataclass
class TileCounts:
    """What one pass of :func:`iter_tiles` did (reset at the start of each pass)."""

    read: int = 0
    skipped_nodata: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (tile_id, reason)


@dataclass
class TileEvent:
    """Reported to ``on_event`` for every tile that is not yielded."""

    kind: str  # "skipped" (over max_nodata) or "failed" (unreadable blocks)
    tile: Tile
    message: str


@dataclass
class TilePlan:
    """Every tile of one job, without pixels: for previews, counts and time estimates."""

    raster_path: str
    spec: TileSpec
    crs: Optional[str]
    tiles: list[Tile]
    bands: tuple[int, int, int] = (1, 2, 3)
    raster_size: tuple[int, int] = (0, 0)  # width, height in native pixels
    raster_transform: Affine = field(default_factory=Affine.identity)
    area_window: tuple[int, int, int, int] = (0, 0, 0, 0)  # col_off, row_off, width, height
    area: Optional[BaseGeometry] = None  # the requested area clipped to the raster, raster CRS
    native_gsd_m: float = 0.0  # at the area's centre
    window_px: int = 0  # native pixels per tile side
    step_px: int = 0  # native pixels between tile origins
    stretch: Any = None  # raster.Stretch, fixed at the first read so all tiles match
    counts: TileCounts = field(default_factory=TileCounts)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def scale(self) -> float:
        """Native pixels per tile-image pixel (> 1: coarser than native)."""
        return self.window_px / self.spec.tile_size


class MissingCrsError(RasterError):
    """The raster has no CRS (front ends that offer pixel space say how to ask for it)."""


def plan_tiles(raster: Union[str, Path], spec: TileSpec = TileSpec(), extent=None,
               extent_crs: Optional[str] = None, aoi: Union[BaseGeometry, str, Path, None] = None,
               pixel_space: bool = False) -> TilePlan:
    """Lay ``spec``'s tiles over ``raster`` within ``extent`` and/or ``aoi``; reads no pixels.

    ``extent`` is (xmin, ymin, xmax, ymax) in ``extent_crs`` (default: the raster CRS), densely
    reprojected. ``aoi`` is a shapely geometry in ``extent_crs`` or a vector file (its own CRS);
    tiles that do not touch it are left out. A raster without CRS is refused unless
    ``pixel_space``: then coordinates are in the raster's own geotransform frame (native
    col/row when it has none) and ``crs`` is None. RasterError on any input that cannot work.
    """
    from .raster import band_dtype, open_raster, resolve_bands

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

    from .raster import is_plain_path

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


def iter_tiles(plan: TilePlan, on_event: Optional[Callable[[TileEvent], None]] = None,
               prefetch: bool = True) -> Iterator[Tile]:
    """Read the plan's tiles lazily: each yielded Tile is a copy with its ``image`` set.

    Tiles over ``spec.max_nodata`` are skipped and tiles whose blocks cannot be read fail; both
    are counted in ``plan.counts`` and reported to ``on_event``, and the job goes on. Memory
    stays proportional to one tile. The 8-bit stretch is computed once and kept on the plan.
    With ``prefetch``, a worker thread decodes the next tile's window while this one is
    converted and used (a local file only: GDAL settings of the caller's thread stay put).
    """
    from .raster import RasterReader, is_plain_path, limit_gdal_cache

    plan.counts = TileCounts()
    with RasterReader(plan.raster_path, plan.bands) as reader:
        limit_gdal_cache(reader.cache_bytes(plan.area_window[2], plan.window_px, plan.scale))
        if plan.stretch is None and reader.needs_stretch:
            from rasterio.windows import Window

            plan.stretch = reader.compute_stretch(Window(*plan.area_window))
        reads = _raw_reads(reader, plan, prefetch and is_plain_path(plan.raster_path))
        try:
            yield from _finish(plan, reader, reads, on_event)
        finally:
            reads.close()  # stops the worker thread before the dataset closes


def _finish(plan: TilePlan, reader, reads, on_event) -> Iterator[Tile]:
    """Raw reads -> 8-bit tiles, counting and reporting failed and skipped ones."""
    for tile, out_hw, raw in reads:
        if isinstance(raw, Exception):
            reason = str(raw.__cause__ or raw)
            plan.counts.failed += 1
            plan.counts.failures.append((tile.tile_id, reason))
            log.debug("tile %s failed: %s", tile.tile_id, reason)
            if on_event:
                on_event(TileEvent("failed", tile, f"unreadable blocks: {reason}"))
            continue
        rgb, invalid = reader.to_rgb(*raw, plan.stretch, plan.spec.pad_rgb)
        image, nodata_frac = _place(plan, rgb, invalid, out_hw)
        if nodata_frac > plan.spec.max_nodata:
            plan.counts.skipped_nodata += 1
            if on_event:
                on_event(TileEvent("skipped", replace(tile, nodata_frac=nodata_frac),
                                   f"{nodata_frac:.0%} nodata"))
            continue
        plan.counts.read += 1
        size = plan.spec.tile_size
        yield replace(tile, image=image, nodata_frac=nodata_frac,
                      valid=None if out_hw == (size, size) else out_hw)


def _raw_reads(reader, plan: TilePlan, prefetch: bool) -> Iterator[tuple[Tile, tuple, Any]]:
    """(tile, output size, raw read or the RasterioError) per tile, in order; with
    ``prefetch`` the reads run one tile ahead in a worker thread."""
    from rasterio.errors import RasterioError

    def read(tile: Tile) -> tuple[tuple[int, int], Any]:
        window, out_hw, resampling = _request(plan, tile)
        try:
            return out_hw, reader.read_raw(window, out_hw, resampling)
        except RasterioError as exc:
            return out_hw, exc

    if not prefetch:
        for tile in plan.tiles:
            yield (tile, *read(tile))
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geochat-tiles")
    try:
        pending = pool.submit(read, plan.tiles[0]) if plan.tiles else None
        for k, tile in enumerate(plan.tiles):
            current = pending
            if k + 1 < len(plan.tiles):
                pending = pool.submit(read, plan.tiles[k + 1])
            yield (tile, *current.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _request(plan: TilePlan, tile: Tile):
    """The part of the tile's window inside the raster, its output size and the resampling."""
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    size, scale = plan.spec.tile_size, plan.scale
    width, height = plan.raster_size
    resampling = (Resampling.nearest if scale == 1 else
                  Resampling.average if scale > 1 else Resampling.bilinear)
    inside_w = min(tile.col_off + tile.width, width) - tile.col_off
    inside_h = min(tile.row_off + tile.height, height) - tile.row_off
    out_w = size if inside_w == tile.width else max(1, min(size, round(inside_w / scale)))
    out_h = size if inside_h == tile.height else max(1, min(size, round(inside_h / scale)))
    return Window(tile.col_off, tile.row_off, inside_w, inside_h), (out_h, out_w), resampling


def _place(plan: TilePlan, rgb: np.ndarray, invalid: int,
           out_hw: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The full (S, S, 3) tile image, padded bottom/right, and its nodata fraction."""
    size = plan.spec.tile_size
    out_h, out_w = out_hw
    nodata_frac = invalid / float(out_h * out_w)  # of the raster's pixels: padding is not nodata
    if out_hw == (size, size):
        return rgb, nodata_frac
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = plan.spec.pad_rgb
    image[:out_h, :out_w] = rgb
    return image, nodata_frac


def model_tile(tile: Tile, crop_padding: bool) -> Tile:
    """The tile as a model sees it: with ``crop_padding`` (a model that pads images itself, as
    GeoPixel does) only its raster pixels, so an edge tile keeps its own shape; the transform
    stays valid (padding lies right and below)."""
    if not crop_padding or tile.valid is None or tile.image is None:
        return tile
    height, width = tile.valid
    return replace(tile, image=tile.image[:height, :width], valid=None)
