"""Result layers: the GeoPackage the runtime wrote for a run, opened in a "GeoChat results"
group and styled from QML (one colour per label)."""
from __future__ import annotations

import colorsys
import hashlib
import re
import uuid
from pathlib import Path
from typing import Optional, Sequence

from qgis.core import (
    QgsApplication,
    QgsCategorizedSymbolRenderer,
    QgsLayerTreeGroup,
    QgsProject,
    QgsRendererCategory,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from ..__about__ import resource
from ..core.errors import ExportError  # stdlib only

GROUP_NAME = "GeoChat results"
RESULTS_FOLDER = "geochat_results"
RESULTS_TABLE = "detections"
STYLE_BOXES = "detections_boxes.qml"
STYLE_MASKS = "detections_masks.qml"
MAP_TIP = (
    "<b>[% \"label\" %]</b>[% CASE WHEN \"score\" IS NOT NULL THEN ' (' || round(\"score\", 2) || ')' END %]"
    "<br/>[% \"phrase\" %]<br/><i>[% \"task\" %]: [% \"prompt\" %]</i><br/>"
    "[% \"model\" %], tile [% \"tile_id\" %]"
)


def label_colour(label: str) -> QColor:
    """A stable, distinct colour per label (same label, same colour, across runs)."""
    hue = int(hashlib.sha1(label.encode("utf-8")).hexdigest()[:8], 16) % 360 / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return QColor(int(r * 255), int(g * 255), int(b * 255))


def results_group(project: QgsProject) -> QgsLayerTreeGroup:
    root = project.layerTreeRoot()
    return root.findGroup(GROUP_NAME) or root.insertGroup(0, GROUP_NAME)


def style_layer(layer: QgsVectorLayer, labels: Sequence[str], masks: bool) -> None:
    """QML base style, then one category (colour) per label on the QML's symbol."""
    layer.loadNamedStyle(str(resource("styles", STYLE_MASKS if masks else STYLE_BOXES)))
    base = layer.renderer().symbol() if hasattr(layer.renderer(), "symbol") else None
    if base is not None and labels:
        categories = []
        for label in sorted(set(labels)):
            symbol = base.clone()
            colour = label_colour(label)
            if masks:
                symbol.setColor(colour)
                symbol.setOpacity(0.45)
            else:
                symbol.symbolLayer(0).setStrokeColor(colour)
            categories.append(QgsRendererCategory(label, symbol, label))
        layer.setRenderer(QgsCategorizedSymbolRenderer("label", categories))
    layer.setMapTipTemplate(MAP_TIP)
    layer.setDisplayExpression('"label"')


def results_folder(project: QgsProject) -> Path:
    """Where result layers are written: beside a saved project, else in the QGIS profile."""
    base = project.absolutePath() or QgsApplication.qgisSettingsDirPath()
    return Path(base) / RESULTS_FOLDER


def safe_layer_name(name: str) -> str:
    """A layer/file name without characters file systems or OGR dislike."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "detections"


def result_path(folder: Path, name: str) -> Path:
    """A new GeoPackage path in ``folder`` for the run called ``name`` (the folder is made).

    Files, not memory layers: results survive saving and reopening the project, and QGIS does
    not warn about losing them on exit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{safe_layer_name(name)[:60]}_{uuid.uuid4().hex[:8]}.gpkg"


def add_result_layer(path: Path, name: str, labels: Sequence[str], masks: bool,
                     project: Optional[QgsProject] = None, table: str = RESULTS_TABLE) -> QgsVectorLayer:
    """Open a written result file (its layer ``table``) as a styled layer at the top of the
    results group."""
    project = project or QgsProject.instance()
    layer = QgsVectorLayer(f"{path}|layername={table}", name, "ogr")
    if not layer.isValid():
        raise ExportError(f"QGIS could not open the results written to {path}")
    style_layer(layer, labels, masks)
    project.addMapLayer(layer, False)
    results_group(project).insertLayer(0, layer)
    return layer
