"""``geochat:export``: a GeoChat result layer to Shapefile, GeoPackage or GeoJSON with the core's
writer (the export schema, shapefile field names, atomic writes) in the runtime child."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from qgis.core import (
    QgsFeatureRequest,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterCrs,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsVectorFileWriter,
)

from . import parameters as p
from .base import GeoChatAlgorithm
from .outputs import output_file
from .running import call, ready_client

CRS = "CRS"
EXPORTED = "EXPORTED"
STAGED_LAYER = "detections"


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
        source = self.parameterAsSource(parameters, p.INPUT, context)
        if source is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, p.INPUT))
        _, path, layer = output_file(self, parameters, context, p.OUTPUT)
        crs = self.parameterAsCrs(parameters, CRS, context)
        if not crs.isValid():
            crs = source.sourceCrs()
        client = ready_client()
        staged, skipped = stage(source, crs, context, feedback)
        if skipped:
            feedback.pushWarning(f"{skipped} features without a polygon were left out.")
        if feedback.isCanceled():
            return {}
        written = call(client.export, staged, STAGED_LAYER, str(path), None, layer)
        feedback.pushInfo(f"Wrote {written['features']} detections to {written['output']}")
        return {p.OUTPUT: written["output"], EXPORTED: written["features"]}


def stage(source, crs, context: QgsProcessingContext, feedback: QgsProcessingFeedback
          ) -> tuple[str, int]:
    """``source``'s polygon features in ``crs``, written by QGIS to a temporary GeoPackage the
    runtime reads (memory layers, selections and reprojection all come this way); (path,
    features left out for having no polygon)."""
    path = QgsProcessingUtils.generateTempFilename("export-source.gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = STAGED_LAYER
    writer = QgsVectorFileWriter.create(path, source.fields(), source.wkbType(), crs,
                                        context.transformContext(), options)
    if writer.hasError() != QgsVectorFileWriter.NoError:
        raise QgsProcessingException(f"Cannot stage the layer for export ({writer.errorMessage()})")
    request = QgsFeatureRequest().setDestinationCrs(crs, context.transformContext())
    skipped = 0
    for feature in source.getFeatures(request):
        if feedback.isCanceled():
            break
        if not feature.hasGeometry() or feature.geometry().isEmpty():
            skipped += 1
            continue
        if not writer.addFeature(feature):
            raise QgsProcessingException(f"Cannot stage the layer for export "
                                         f"({writer.errorMessage()})")
    del writer  # closes the file
    return str(Path(path)), skipped
