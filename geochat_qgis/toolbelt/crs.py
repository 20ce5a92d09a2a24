"""CRS values as the runtime takes them ('EPSG:n' or WKT) and back, with QGIS alone."""
from __future__ import annotations

from typing import Optional

from qgis.core import Qgis, QgsCoordinateReferenceSystem


def crs_from_text(text: Optional[str]) -> QgsCoordinateReferenceSystem:
    """A QgsCoordinateReferenceSystem from WKT or an authority string ('' -> invalid)."""
    if not text:
        return QgsCoordinateReferenceSystem()
    if "[" in text:  # WKT
        return QgsCoordinateReferenceSystem.fromWkt(text)
    return QgsCoordinateReferenceSystem(text)


def crs_to_text(crs: QgsCoordinateReferenceSystem) -> Optional[str]:
    """'EPSG:n' when QGIS knows the code, else WKT2; None when invalid."""
    if not crs.isValid():
        return None
    if crs.authid().upper().startswith("EPSG:"):
        return crs.authid()
    variants = getattr(Qgis, "CrsWktVariant", None)  # QGIS >= 3.36; the older name before
    preferred = variants.Preferred if variants else QgsCoordinateReferenceSystem.WKT_PREFERRED
    return crs.toWkt(preferred)
