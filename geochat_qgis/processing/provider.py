"""The Processing provider: id ``geochat``."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..__about__ import resource, version


class GeoChatProvider(QgsProcessingProvider):
    """Holds the GeoChat algorithms (detect, segment, describe, export)."""

    def id(self) -> str:  # noqa: A003 - QGIS API
        return "geochat"

    def name(self) -> str:
        return "GeoChat"

    def longName(self) -> str:  # noqa: N802
        return f"GeoChat {version()}"

    def icon(self) -> QIcon:
        return QIcon(str(resource("icon.png")))

    def unload(self) -> None:
        """Removed from the registry (plugin unload): free the models kept for batches."""
        from .running import release_models

        release_models()
        super().unload()

    def loadAlgorithms(self) -> None:  # noqa: N802
        from .algorithms import algorithms

        for algorithm in algorithms():
            self.addAlgorithm(algorithm)
