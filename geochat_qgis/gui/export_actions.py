"""Exporting result layers with the core's writer: one layer to a file, or all of them at once."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from qgis.core import QgsProject, QgsVectorLayer

from ..core.export import export_detections
from ..toolbelt.feature_detections import feature_detections
from .area import crs_wkt
from .result_layers import GROUP_NAME, safe_layer_name

ALL_RESULTS_FILE = "geochat_results.gpkg"


def result_layers(project: QgsProject) -> list[QgsVectorLayer]:
    """The vector layers in the "GeoChat results" group, top first."""
    group = project.layerTreeRoot().findGroup(GROUP_NAME)
    if group is None:
        return []
    return [node.layer() for node in group.findLayers() if isinstance(node.layer(), QgsVectorLayer)]


def default_export_folder(project: QgsProject) -> Path:
    """Beside the project file when it is saved, else the home folder."""
    return Path(project.absolutePath()) if project.absolutePath() else Path.home()


def export_layer(layer: QgsVectorLayer, path: Path, layer_name: Optional[str] = None) -> Path:
    """Write ``layer``'s detections to ``path`` (.shp, .gpkg or .geojson), atomically."""
    crs = crs_wkt(layer.crs())
    detections = feature_detections(layer.getFeatures(), crs)
    return export_detections(detections, path, crs, layer_name)


def export_all(project: QgsProject, path: Path) -> list[str]:
    """Every result layer into one GeoPackage, one table each; returns the table names."""
    written = []
    for layer in result_layers(project):
        name = safe_layer_name(layer.name())
        export_layer(layer, path, name)
        written.append(name)
    return written
