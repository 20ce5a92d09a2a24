"""Exporting result layers with the core's writer (in the runtime): one layer to a file, or all
of them into one GeoPackage."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from qgis.core import QgsProject, QgsVectorLayer

from ..client import RuntimeClientError
from ..core.errors import ExportError  # stdlib only
from .result_layers import GROUP_NAME, safe_layer_name
from .runner import client

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


def layer_file(layer: QgsVectorLayer) -> tuple[str, Optional[str]]:
    """(file, layer name inside it) of a result layer opened from a file."""
    parts = layer.source().split("|")
    table = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("layername=")), None)
    if layer.providerType() != "ogr" or not Path(parts[0]).is_file():
        raise ExportError(f"'{layer.name()}' is not a GeoChat result file: export it with "
                          "Layer > Save As...")
    return parts[0], table


def export_layer(layer: QgsVectorLayer, path: Path, layer_name: Optional[str] = None) -> Path:
    """Write ``layer``'s features to ``path`` (.shp, .gpkg or .geojson), atomically; into the
    GeoPackage table ``layer_name`` when given (the file's other tables stay)."""
    source, table = layer_file(layer)
    if layer.isEditable() and layer.isModified():
        raise ExportError(f"'{layer.name()}' has unsaved edits: save or discard them first")
    try:
        reply = client().export(source, table, str(path), destination_layer=layer_name)
    except RuntimeClientError as exc:
        raise ExportError(exc.message) from None
    return Path(reply.get("output") or path)


def export_all(project: QgsProject, path: Path) -> list[str]:
    """Every result layer into one GeoPackage, one table each; returns the table names."""
    written = []
    for layer in result_layers(project):
        name = safe_layer_name(layer.name())
        export_layer(layer, path, name)
        written.append(name)
    return written
