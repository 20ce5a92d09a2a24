"""The Processing provider: id ``geochat``."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..__about__ import resource, version
from .algorithms import algorithms
from .outputs import EXTENSIONS


class GeoChatProvider(QgsProcessingProvider):
    """Holds the GeoChat algorithms (detect, segment, describe, export). Their models run in
    GeoChat's runtime child (``geochat_qgis.client``); the plugin's unload stops it."""

    def id(self) -> str:  # noqa: A003 - QGIS API
        return "geochat"

    def name(self) -> str:
        return "GeoChat"

    def longName(self) -> str:  # noqa: N802
        return f"GeoChat {version()}"

    def icon(self) -> QIcon:
        return QIcon(str(resource("icon.png")))

    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802
        """What the core's writer writes (the runtime writes the outputs itself)."""
        return list(EXTENSIONS)

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N802,N803
        return "gpkg"

    def loadAlgorithms(self) -> None:  # noqa: N802
        for algorithm in algorithms():
            self.addAlgorithm(algorithm)
