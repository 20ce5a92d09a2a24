"""The list of GeoChat Processing algorithms (each in its own module)."""
from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm


def algorithms() -> list[QgsProcessingAlgorithm]:
    """New instances of every algorithm the provider offers."""
    return []
