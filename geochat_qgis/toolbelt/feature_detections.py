"""QGIS features back to core Detections: what exporting a result layer with the core needs.

The reverse of :mod:`.detection_features`: the export schema's fields a feature has are read
back (missing or NULL ones stay unset), its geometry is taken as it is, in ``crs``.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from qgis.core import QgsFeature, QgsGeometry, QgsWkbTypes
from qgis.PyQt.QtCore import QVariant

from ..core.export import PROVENANCE
from ..core.results import Detection


def _value(feature: QgsFeature, names: set[str], name: str) -> Any:
    """The attribute ``name`` as a Python value, None when the feature lacks it or it is NULL."""
    if name not in names:
        return None
    value = feature.attribute(name)
    if isinstance(value, QVariant):
        return None if value.isNull() else value.value()
    return value


def _number(value: Any) -> Optional[float]:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def to_shapely(geometry: QgsGeometry):
    """A QgsGeometry as a 2D shapely geometry (curves segmentised, Z and M dropped)."""
    import shapely

    flat = QgsGeometry(geometry)
    flat.convertToStraightSegment()
    flat.get().dropZValue()
    flat.get().dropMValue()
    return shapely.from_wkb(bytes(flat.asWkb()))


def feature_detection(feature: QgsFeature, crs: Optional[str]) -> Optional[Detection]:
    """One feature as a georeferenced Detection (None when it has no polygonal geometry)."""
    geometry = feature.geometry()
    if geometry.isEmpty() or geometry.type() != QgsWkbTypes.PolygonGeometry:
        return None
    names = set(feature.fields().names())

    def text(name: str) -> Any:
        return _value(feature, names, name)

    flags = str(text("flags") or "")
    return Detection(
        label=str(text("label") or ""),
        geometry=to_shapely(geometry),
        kind=str(text("kind") or "box"),
        phrase=str(text("phrase") or ""),
        angle=_number(text("angle")),
        score=_number(text("score")),
        flags=[flag for flag in flags.split(",") if flag],
        tile_id=str(text("tile_id") or ""),
        frame="crs",
        crs=crs,
        attributes={name: str(text(name)) for name in PROVENANCE if text(name) is not None},
    )


def feature_detections(features: Iterable[QgsFeature], crs: Optional[str]) -> list[Detection]:
    """The polygonal features of ``features`` as Detections in ``crs`` (others are skipped)."""
    found = (feature_detection(feature, crs) for feature in features)
    return [detection for detection in found if detection is not None]
