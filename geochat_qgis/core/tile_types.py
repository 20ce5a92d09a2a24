"""The tiling's data: how a model wants its tiles (:class:`TileSpec`), one tile and where it lies
(:class:`Tile`), a job's plan of tiles (:class:`TilePlan`) and what reading them did. Below both
the georeferencing (which maps a tile's pixels) and the tiling itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from affine import Affine
from shapely.geometry.base import BaseGeometry

from .errors import RasterError

GEOCHAT_PAD_RGB = (122, 116, 104)  # CLIP mean x 255, truncated: what GeoChat pads with


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
