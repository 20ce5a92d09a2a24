"""Map tools: a rectangle for the area, a polygon (or box) for an [identify] region."""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsGeometry, QgsPointXY
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QKeyEvent

from ..toolbelt.qgis_compat import POLYGON_GEOMETRY


class RegionMapTool(QgsMapTool):
    """Left clicks add vertices, a right click (or Enter) closes the polygon, Esc starts over.

    Two clicks then a right click give the rectangle they span. Emits ``regionDrawn`` with the
    polygon in canvas CRS.
    """

    regionDrawn = pyqtSignal(QgsGeometry)  # noqa: N815

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.points: list[QgsPointXY] = []
        self.band = QgsRubberBand(canvas, POLYGON_GEOMETRY)
        self.band.setColor(QColor(255, 140, 0, 90))
        self.band.setStrokeColor(QColor(255, 140, 0))
        self.band.setWidth(2)

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if event.button() == Qt.MouseButton.RightButton:
            self.finish()
            return
        self.points.append(self.toMapCoordinates(event.pos()))
        self._redraw()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self.finish()
        elif event.key() == Qt.Key.Key_Escape:
            self.reset()

    def geometry(self) -> Optional[QgsGeometry]:
        """The drawn region: a polygon of 3+ points, or the rectangle of 2."""
        if len(self.points) >= 3:
            return QgsGeometry.fromPolygonXY([self.points + [self.points[0]]])
        if len(self.points) == 2:
            a, b = self.points
            return QgsGeometry.fromRect(QgsGeometry.fromPolylineXY([a, b]).boundingBox())
        return None

    def finish(self) -> None:
        geometry = self.geometry()
        if geometry is not None and not geometry.isEmpty():
            self.regionDrawn.emit(geometry)
        self.points = []

    def reset(self) -> None:
        self.points = []
        self.band.reset(POLYGON_GEOMETRY)

    def _redraw(self) -> None:
        geometry = self.geometry()
        if geometry is not None:
            self.band.setToGeometry(geometry, None)

    def clear(self) -> None:
        """Remove the rubber band from the canvas (on unload)."""
        self.reset()
        self.canvas().scene().removeItem(self.band)
