"""Detections (core) as QGIS fields and features: shared by result layers and Processing."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import shapely
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsVectorLayer,
)

from ..core.export import FIELDS, feature_values
from ..core.results import Detection, polygonal
from .fields import field_type

FEATURE_ID_FIELD = "det_index"  # position of the detection in its run: links phrases to features


def detection_fields() -> QgsFields:
    """The export schema (core.export.FIELDS) as QgsFields, plus the detection index."""
    fields = QgsFields()
    for spec in FIELDS:
        fields.append(QgsField(spec.name, field_type(spec.type)))
    fields.append(QgsField(FEATURE_ID_FIELD, field_type("int")))
    return fields


def crs_from_text(text: Optional[str]) -> QgsCoordinateReferenceSystem:
    """A QgsCoordinateReferenceSystem from WKT or an authority string ('' -> invalid)."""
    if not text:
        return QgsCoordinateReferenceSystem()
    if "[" in text:  # WKT
        return QgsCoordinateReferenceSystem.fromWkt(text)
    return QgsCoordinateReferenceSystem(text)


def crs_to_text(crs: QgsCoordinateReferenceSystem) -> Optional[str]:
    """A CRS as the core takes it: 'EPSG:n' when QGIS knows the code, else WKT2; None if invalid."""
    if not crs.isValid():
        return None
    if crs.authid().upper().startswith("EPSG:"):
        return crs.authid()
    return crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)


def detection_feature(
    det: Detection, index: int, fields: QgsFields, provenance: Optional[Mapping[str, Any]] = None
) -> QgsFeature:
    """One feature: the detection's polygon (WKB, no reprojection) and its attributes."""
    feature = QgsFeature(fields)
    geometry = QgsGeometry()
    # 2D WKB: inside QGIS processes shapely's GEOS calls can bind to QGIS's older GEOS, which
    # refuses the 4-dimension WKB newer shapely asks for by default
    geometry.fromWkb(shapely.to_wkb(polygonal(det.geometry), output_dimension=2))
    feature.setGeometry(geometry)
    for name, value in feature_values(det, provenance).items():
        feature[name] = value
    feature[FEATURE_ID_FIELD] = index
    return feature


def detection_features(
    detections: Iterable[Detection], fields: QgsFields, provenance: Optional[Mapping[str, Any]] = None
) -> list[QgsFeature]:
    return [detection_feature(d, i, fields, provenance) for i, d in enumerate(detections)]


def memory_layer(name: str, crs: QgsCoordinateReferenceSystem) -> QgsVectorLayer:
    """An empty polygon memory layer with the detection fields."""
    layer = QgsVectorLayer(f"MultiPolygon?crs={crs.authid() or 'EPSG:4326'}", name, "memory")
    if not crs.authid():
        layer.setCrs(crs)
    provider = layer.dataProvider()
    provider.addAttributes(detection_fields().toList())
    layer.updateFields()
    return layer
