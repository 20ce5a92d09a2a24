"""The area a run covers, from the analyst's choice: canvas, layer, drawn rectangle, selection."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import shapely
from qgis.core import QgsCoordinateReferenceSystem, QgsMapLayer, QgsRectangle, QgsVectorLayer, QgsWkbTypes
from qgis.gui import QgsMapCanvas
from shapely.geometry.base import BaseGeometry

from ..core.errors import GeoChatError
from ..toolbelt.detection_features import crs_to_text
from ..toolbelt.feature_detections import to_shapely

CANVAS, LAYER, RECTANGLE, SELECTION = "canvas", "layer", "rectangle", "selection"
CHOICES = {
    CANVAS: "Map canvas extent",
    LAYER: "Whole layer",
    RECTANGLE: "Drawn rectangle",
    SELECTION: "Selected polygons",
}


@dataclass
class Area:
    """What the core needs: an extent and/or AOI polygons, in ``crs`` (WKT)."""

    extent: Optional[tuple[float, float, float, float]]
    crs: str
    aoi: Optional[BaseGeometry] = None
    description: str = ""


def crs_wkt(crs: QgsCoordinateReferenceSystem) -> str:
    """The CRS as the core takes it ('EPSG:n' or WKT); '' when invalid."""
    return crs_to_text(crs) or ""


def rectangle_tuple(rect: QgsRectangle) -> tuple[float, float, float, float]:
    return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())


def rectangle_area(rect: Optional[QgsRectangle], crs: QgsCoordinateReferenceSystem, what: str,
                   remedy: str = "press Draw and drag a rectangle on the map") -> Area:
    if rect is None or rect.isEmpty():
        raise GeoChatError(f"the {what} is empty: {remedy}")
    return Area(rectangle_tuple(rect), crs_wkt(crs), None, what)


def canvas_area(canvas: QgsMapCanvas) -> Area:
    return rectangle_area(canvas.extent(), canvas.mapSettings().destinationCrs(),
                          "map canvas extent", "zoom the map to the raster first")


def layer_area(layer: QgsMapLayer) -> Area:
    return rectangle_area(layer.extent(), layer.crs(), f"whole layer '{layer.name()}'",
                          "the layer has no extent; check its georeferencing")


def selection_area(layer: Optional[QgsMapLayer]) -> Area:
    """The selected polygons of a vector layer as the AOI."""
    if not isinstance(layer, QgsVectorLayer) or layer.geometryType() != QgsWkbTypes.PolygonGeometry:
        raise GeoChatError("select polygons in a polygon layer (and make it the AOI layer) first")
    geoms = [f.geometry() for f in layer.getSelectedFeatures() if not f.geometry().isEmpty()]
    if not geoms:
        raise GeoChatError(f"no polygon is selected in '{layer.name()}': select one or more first")
    aoi = shapely.union_all([to_shapely(g) for g in geoms])
    return Area(aoi.bounds, crs_wkt(layer.crs()), aoi,
                f"{len(geoms)} selected polygon(s) of '{layer.name()}'")

