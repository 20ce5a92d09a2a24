"""The tiling preview on the canvas: the tile grid a run will use, its count and time estimate."""
from __future__ import annotations

from typing import Optional, Sequence

from qgis.core import QgsGeometry
from qgis.gui import QgsMapCanvas, QgsRubberBand
from qgis.PyQt.QtGui import QColor

from ..toolbelt.crs import crs_from_text
from ..toolbelt.qgis_compat import POLYGON_GEOMETRY

MAX_DRAWN = 5000  # beyond this the grid is summarised, not drawn tile by tile
ASK_ABOVE_TILES = 1000  # a run with more tiles asks first, however fast the model


def estimate_seconds(tiles: int, prompts: int, seconds_per_tile: float) -> float:
    return tiles * max(1, prompts) * seconds_per_tile


def human_duration(seconds: float) -> str:
    minutes = seconds / 60
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def describe_estimate(tiles: int, seconds: float) -> str:
    return f"{tiles} tile(s), about {human_duration(seconds)}"


class TilePreview:
    """Draws a plan's tile footprints on the canvas (in the canvas CRS)."""

    def __init__(self, canvas: QgsMapCanvas) -> None:
        self.canvas = canvas
        self.band: Optional[QgsRubberBand] = None

    def show(self, footprints_wkt: Sequence[str], crs_text: Optional[str]) -> int:
        """Draw the tile footprints (WKT in ``crs_text``, as the runtime's plan gives them);
        returns how many were drawn."""
        self.clear()
        band = QgsRubberBand(self.canvas, POLYGON_GEOMETRY)
        band.setColor(QColor(0, 120, 255, 25))
        band.setStrokeColor(QColor(0, 120, 255, 200))
        band.setWidth(1)
        source = crs_from_text(crs_text) if crs_text else self.canvas.mapSettings().destinationCrs()
        drawn = 0
        for wkt in footprints_wkt[:MAX_DRAWN]:
            # the rubber band reprojects from the plan's CRS to the canvas CRS
            band.addGeometry(QgsGeometry.fromWkt(wkt), source, False)
            drawn += 1
        band.updatePosition()
        band.update()
        self.band = band
        return drawn

    def clear(self) -> None:
        if self.band is not None:
            self.canvas.scene().removeItem(self.band)
            self.band = None
