"""Result layers: one memory layer per run, in a "GeoChat results" group, styled from QML."""
from __future__ import annotations

import colorsys
import hashlib
from typing import Any, Mapping, Optional, Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsLayerTreeGroup,
    QgsProject,
    QgsRendererCategory,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from ..__about__ import resource
from ..core.results import Detection
from ..toolbelt.detection_features import crs_from_text, detection_features, memory_layer

GROUP_NAME = "GeoChat results"
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


def add_result_layer(
    detections: Sequence[Detection],
    crs_text: Optional[str],
    name: str,
    project: Optional[QgsProject] = None,
    provenance: Optional[Mapping[str, Any]] = None,
) -> QgsVectorLayer:
    """A styled memory layer of ``detections`` (already in ``crs_text``) added to the project."""
    project = project or QgsProject.instance()
    layer = memory_layer(name, crs_from_text(crs_text))
    layer.dataProvider().addFeatures(detection_features(detections, layer.fields(), provenance))
    layer.updateExtents()
    masks = bool(detections) and all(d.kind == "mask" for d in detections)
    style_layer(layer, [d.label for d in detections], masks)
    project.addMapLayer(layer, False)
    results_group(project).insertLayer(0, layer)
    return layer
