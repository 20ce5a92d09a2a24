"""The area a run covers, from the analyst's choice: canvas, layer, drawn rectangle, selection.

Plain values for the runtime request: an extent, its CRS ('EPSG:n' or WKT) and the selected
polygons as WKT (QGIS geometry only; the runtime unions and reprojects them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from qgis.core import QgsCoordinateReferenceSystem, QgsMapLayer, QgsRectangle, QgsVectorLayer
from qgis.gui import QgsMapCanvas

from ..core.errors import GeoChatError  # stdlib only
from ..toolbelt.crs import crs_to_text
from ..toolbelt.qgis_compat import POLYGON_GEOMETRY

CANVAS, LAYER, RECTANGLE, SELECTION = "canvas", "layer", "rectangle", "selection"
CHOICES = {
    CANVAS: "Map canvas extent",
    LAYER: "Whole layer",
    RECTANGLE: "Drawn rectangle",
    SELECTION: "Selected polygons",
}


@dataclass
class Area:
    """An extent and/or AOI polygons (WKT), both in ``crs`` ('EPSG:n' or WKT)."""

    extent: Optional[tuple[float, float, float, float]]
    crs: str
    aoi_wkt: list[str] = field(default_factory=list)
    description: str = ""

    def request(self) -> dict[str, Any]:
        """The request keys of this area (extent, extent_crs, aoi_wkt, aoi_crs)."""
        keys: dict[str, Any] = {"extent": list(self.extent) if self.extent else None,
                                "extent_crs": self.crs or None}
        if self.aoi_wkt:
            keys.update(aoi_wkt=list(self.aoi_wkt), aoi_crs=self.crs or None)
        return keys


def crs_wkt(crs: QgsCoordinateReferenceSystem) -> str:
    """The CRS as the runtime takes it ('EPSG:n' or WKT); '' when invalid."""
    return crs_to_text(crs) or ""


def rectangle_tuple(rect: QgsRectangle) -> tuple[float, float, float, float]:
    return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())


def rectangle_area(rect: Optional[QgsRectangle], crs: QgsCoordinateReferenceSystem, what: str,
                   remedy: str = "press Draw and drag a rectangle on the map") -> Area:
    if rect is None or rect.isEmpty():
        raise GeoChatError(f"the {what} is empty: {remedy}")
    return Area(rectangle_tuple(rect), crs_wkt(crs), [], what)


def canvas_area(canvas: QgsMapCanvas) -> Area:
    return rectangle_area(canvas.extent(), canvas.mapSettings().destinationCrs(),
                          "map canvas extent", "zoom the map to the raster first")


def layer_area(layer: QgsMapLayer) -> Area:
    return rectangle_area(layer.extent(), layer.crs(), f"whole layer '{layer.name()}'",
                          "the layer has no extent; check its georeferencing")


def selection_area(layer: Optional[QgsMapLayer]) -> Area:
    """The selected polygons of a vector layer as the AOI (their bounding box as the extent)."""
    if not isinstance(layer, QgsVectorLayer) or layer.geometryType() != POLYGON_GEOMETRY:
        raise GeoChatError("select polygons in a polygon layer (and make it the AOI layer) first")
    geoms = [f.geometry() for f in layer.getSelectedFeatures()
             if not f.geometry().isNull() and not f.geometry().isEmpty()]
    if not geoms:
        raise GeoChatError(f"no polygon is selected in '{layer.name()}': select one or more first")
    bounds = QgsRectangle(geoms[0].boundingBox())
    for geometry in geoms[1:]:
        bounds.combineExtentWith(geometry.boundingBox())
    return Area(rectangle_tuple(bounds), crs_wkt(layer.crs()), [g.asWkt() for g in geoms],
                f"{len(geoms)} selected polygon(s) of '{layer.name()}'")
