"""QGIS enums whose home moved between 3.22 and 4 (Qt6): one name for every version."""
from __future__ import annotations

from qgis.core import Qgis, QgsWkbTypes

# Qgis.GeometryType since 3.30 (QgsWkbTypes.GeometryType is deprecated there, gone in QGIS 4)
POLYGON_GEOMETRY = (Qgis.GeometryType.Polygon if hasattr(Qgis, "GeometryType")
                    else QgsWkbTypes.GeometryType.PolygonGeometry)
