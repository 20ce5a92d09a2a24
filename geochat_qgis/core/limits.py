"""What one run may ask of the machine, checked when tiles are planned (before any pixel is
read, so every front end gets it): the memory one tile needs, and the number of tiles.

A tile is read at ``tile_size`` pixels whatever its ground size, so its memory follows the tile
size, the bands and their data type: the raw values of this tile and the next (read ahead), the
float32 stretch, the nodata mask, the 8-bit image and the tiles queued for the model, and the
model's input as float32 before the model resizes it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import RasterError
from .weights.machine import memory_available

MAX_TILES = 100_000  # a plan above this is refused: at a second a tile, more than a day
MEMORY_SHARE = 0.8  # of the memory available now that one tile's work may take
QUEUED_TILES = 3  # 8-bit tiles waiting for the model (the pipeline reads ahead)
SECONDS_PER_TILE = 1.0  # a fast GPU's time for one tile and prompt: the lower bound said


def tile_memory_bytes(tile_size: int, bands: int, dtype: np.dtype) -> int:
    """Bytes of memory one tile of ``tile_size`` px with ``bands`` bands of ``dtype`` needs
    while it is read and prepared for the model (an estimate on the safe side)."""
    pixels = int(tile_size) ** 2
    raw = 2 * bands * np.dtype(dtype).itemsize  # this tile's values and the next one's
    prepare = 2 * 4 + 1 + 3  # float32 stretch and its temporary, nodata mask, 8-bit RGB
    queued = 3 * QUEUED_TILES
    model = 3 * 4  # the image as float32 before the model's own resize
    return pixels * (raw + prepare + queued + model)


def gigabytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.0f} MB"


def duration(seconds: float) -> str:
    """``seconds`` in the largest unit that fits (s, min, h, days)."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"


def check_tile_memory(tile_size: int, bands: int, dtype: np.dtype,
                      available: Optional[int] = None) -> None:
    """RasterError naming the numbers when one tile needs more memory than this machine has
    free (nothing is checked where the free memory cannot be told)."""
    available = memory_available() if available is None else available
    need = tile_memory_bytes(tile_size, bands, dtype)
    if available is None or need <= MEMORY_SHARE * available:
        return
    raise RasterError(
        f"A tile of {tile_size:,} x {tile_size:,} px ({bands} band(s) of {np.dtype(dtype).name}) "
        f"needs about {gigabytes(need)} of memory to read and prepare for the model, and this "
        f"machine has {gigabytes(available)} available. Use a smaller tile size (leave it "
        "unset for the model's own, a few hundred pixels; a coarser GSD makes each tile cover "
        "more ground at the same size) or free some memory.")


def check_tile_count(cols: int, rows: int, tile_size: int, window_px: int, step_px: int,
                     max_tiles: int = MAX_TILES) -> None:
    """RasterError naming the count, a time estimate and the setting to change when a plan
    has more than ``max_tiles`` tiles."""
    count = cols * rows
    if count <= max_tiles:
        return
    if step_px * 4 <= window_px:
        cause = (f"the overlap leaves only {step_px} native px between tiles of {window_px}: "
                 "use an overlap well below 1 (0.1 is usual)")
    elif window_px < tile_size:
        cause = (f"the target GSD makes each {tile_size} px tile cover only {window_px} native "
                 "px (finer than the raster): use a coarser GSD or leave it unset")
    else:
        cause = "choose a smaller area, a coarser GSD or larger tiles, or split the area"
    raise RasterError(
        f"This plan has {count:,} tiles ({cols:,} x {rows:,}), more than the limit of "
        f"{max_tiles:,}; even at {SECONDS_PER_TILE:g} s a tile it would run "
        f"{duration(count * SECONDS_PER_TILE)}: {cause}.")
