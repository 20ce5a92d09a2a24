"""Reading a plan's tiles (core/tiling.py plans them): lazily, as 8-bit RGB images of exactly
``tile_size`` pixels, one tile ahead in a worker thread. A raster smaller than one tile, or the
raster's edge, is padded (bottom/right) with the model's pad colour, never stretched; coarser
target GSDs read bigger windows down to ``tile_size`` with average resampling (GDAL uses
overviews where they exist)."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .raster import RasterReader, is_plain_path, limit_gdal_cache
from .tile_types import Tile, TileCounts, TileEvent, TilePlan

log = logging.getLogger(__name__)


def iter_tiles(plan: TilePlan, on_event: Optional[Callable[[TileEvent], None]] = None,
               prefetch: bool = True) -> Iterator[Tile]:
    """Read the plan's tiles lazily: each yielded Tile is a copy with its ``image`` set.

    Tiles over ``spec.max_nodata`` are skipped and tiles whose blocks cannot be read fail; both
    are counted in ``plan.counts`` and reported to ``on_event``, and the job goes on. Memory
    stays proportional to one tile. The 8-bit stretch is computed once and kept on the plan.
    With ``prefetch``, a worker thread decodes the next tile's window while this one is
    converted and used (a local file only: GDAL settings of the caller's thread stay put).
    """
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
