"""``geochat:export``: a GeoChat result layer to Shapefile, GeoPackage or GeoJSON with the core's
writer (the export schema, shapefile field names, atomic writes)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterCrs,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterVectorDestination,
)

from ..core.threads import in_python_thread
from . import parameters as p
from .base import GeoChatAlgorithm

CRS = "CRS"
EXPORTED = "EXPORTED"
# what the "Save to GeoPackage..." choice of a vector destination gives
_OGR_URI = re.compile(
    r"^ogr:dbname='(?P<path>(?:[^']|'')+)'\s+table=\"(?P<layer>(?:[^\"]|\"\")+)\"")


class ExportAlgorithm(GeoChatAlgorithm):
    """Writes detections the way ``detect`` and the dock's "Export detections..." do."""

    NAME = "export"
    DISPLAY_NAME = "Export detections"
    HELP = (
        "Writes a GeoChat result layer (or any polygon layer; the detection fields it has are "
        "kept) to a Shapefile (.shp), GeoPackage (.gpkg) or GeoJSON (.geojson) file with the "
        "GeoChat export schema: shapefile-safe field names, text cut to whole characters, and "
        "an atomic write that never leaves a half-written file. Writing into an existing "
        "GeoPackage keeps its other layers."
    )

    def initAlgorithm(self, config: Optional[dict[str, Any]] = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterFeatureSource(
            p.INPUT, "Detections", [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterCrs(
            CRS, "Output CRS (default: the layer's)", optional=True))
        self.addParameter(QgsProcessingParameterVectorDestination(
            p.OUTPUT, "Exported detections", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(EXPORTED, "Detections written"))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from ..core.errors import GeoChatError
        from ..core.export import export_detections
        from ..toolbelt.feature_detections import feature_detections

        source = self.parameterAsSource(parameters, p.INPUT, context)
        if source is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, p.INPUT))
        crs = self.parameterAsCrs(parameters, CRS, context)
        if not crs.isValid():
            crs = source.sourceCrs()
        path, layer = destination(self.parameterAsOutputLayer(parameters, p.OUTPUT, context))
        detections = feature_detections(source.getFeatures(), p.crs_text(source.sourceCrs()))
        skipped = source.featureCount() - len(detections)
        if skipped > 0:
            feedback.pushWarning(f"{skipped} features without a polygon were left out.")
        if feedback.isCanceled():
            return {}
        try:
            written = in_python_thread(export_detections, detections, path, p.crs_text(crs),
                                       layer)  # pyproj: see core.threads
        except GeoChatError as exc:
            raise QgsProcessingException(str(exc)) from exc
        feedback.pushInfo(f"Wrote {len(detections)} detections to {written}")
        return {p.OUTPUT: str(written), EXPORTED: len(detections)}


def destination(value: str) -> tuple[Path, Optional[str]]:
    """The file and layer name of a vector destination: a path, or an ``ogr:dbname=...`` URI."""
    match = _OGR_URI.match(value)
    if match:
        return (Path(match["path"].replace("''", "'")),
                match["layer"].replace('""', '"'))
    if "|" in value:
        path, _, options = value.partition("|")
        layer = re.search(r"layername=([^|]+)", options)
        return Path(path), layer.group(1) if layer else None
    return Path(value), None
