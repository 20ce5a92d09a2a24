"""QgsField construction that suits QGIS 3.22 to 4: QVariant types before 3.38, QMetaType after.

QGIS 3.38 deprecated ``QgsField(name, QVariant.Type)`` (and Qt6 has no ``QVariant.Type``), while
QGIS 3.22's constructor accepts only ``QVariant.Type``.
"""
from __future__ import annotations

from qgis.core import Qgis, QgsField, QgsFields

QMETATYPE_SINCE = 33800
# our type name -> (QMetaType.Type member, QVariant member)
_TYPES = {"str": ("QString", "String"), "int": ("Int", "Int"), "float": ("Double", "Double")}


def field_type(kind: str):
    """The type value ``QgsField`` takes on this QGIS for ``kind`` (str, int or float)."""
    meta, variant = _TYPES[kind]
    if Qgis.versionInt() >= QMETATYPE_SINCE:
        from qgis.PyQt.QtCore import QMetaType

        return getattr(QMetaType.Type, meta)
    from qgis.PyQt.QtCore import QVariant

    return getattr(QVariant, variant)


def make_fields(spec: list[tuple[str, str]]) -> QgsFields:
    """QgsFields from ``[(name, kind), ...]``."""
    fields = QgsFields()
    for name, kind in spec:
        fields.append(QgsField(name, field_type(kind)))
    return fields
