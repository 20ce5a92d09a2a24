"""One-line descriptions of the layer the dock works on."""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsMapLayer, QgsRasterLayer, QgsUnitTypes

NO_RASTER_HINT = "Select a raster layer in the Layers panel to chat about it."


def raster_or_none(layer: Optional[QgsMapLayer]) -> Optional[QgsRasterLayer]:
    """The layer if it is a valid raster layer, else None."""
    if isinstance(layer, QgsRasterLayer) and layer.isValid():
        return layer
    return None


def describe_raster(layer: QgsRasterLayer) -> str:
    """Name, CRS, size in pixels and pixel size with units, e.g. for the dock's header."""
    crs = layer.crs()
    crs_text = crs.authid() or crs.description() or "no CRS"
    units = QgsUnitTypes.toAbbreviatedString(crs.mapUnits()) if crs.isValid() else "px"
    return (
        f"{layer.name()} | {crs_text} | {layer.width()} x {layer.height()} px, "
        f"{layer.bandCount()} band(s) | pixel {layer.rasterUnitsPerPixelX():.6g} x "
        f"{layer.rasterUnitsPerPixelY():.6g} {units}"
    )


def describe_layer(layer: Optional[QgsMapLayer]) -> str:
    """The header text for any layer, or what to select when it is not a raster."""
    raster = raster_or_none(layer)
    if raster is not None:
        return describe_raster(raster)
    if layer is None:
        return "No layer selected. " + NO_RASTER_HINT
    return f"'{layer.name()}' is not a raster layer. " + NO_RASTER_HINT
