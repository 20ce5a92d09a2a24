"""What every GeoChat algorithm shares: names, help text, icon, a fresh instance per run."""
from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm
from qgis.PyQt.QtGui import QIcon

from ..__about__ import resource


class GeoChatAlgorithm(QgsProcessingAlgorithm):
    """Subclasses set NAME (the id after ``geochat:``), DISPLAY_NAME and HELP."""

    NAME = ""
    DISPLAY_NAME = ""
    HELP = ""

    def name(self) -> str:
        return self.NAME

    def displayName(self) -> str:  # noqa: N802 - QGIS API
        return self.DISPLAY_NAME

    def shortHelpString(self) -> str:  # noqa: N802
        return self.HELP

    def tags(self) -> list[str]:
        return ["geochat", "vision language model", "vlm", "ai", "remote sensing", self.NAME]

    def icon(self) -> QIcon:
        return QIcon(str(resource("icon.png")))

    def createInstance(self) -> "GeoChatAlgorithm":  # noqa: N802
        return type(self)()
