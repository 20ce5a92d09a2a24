"""The dock's bottom bar: export the current result layer, export all, open the settings."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from qgis.core import QgsProject, QgsVectorLayer
from qgis.gui import QgisInterface
from qgis.PyQt.QtWidgets import QFileDialog, QHBoxLayout, QToolButton, QWidget

from ..core.errors import GeoChatError
from .export_actions import (
    ALL_RESULTS_FILE,
    default_export_folder,
    export_all,
    export_layer,
    result_layers,
    safe_layer_name,
)

FILTERS = "GeoPackage (*.gpkg);;Shapefile (*.shp);;GeoJSON (*.geojson)"


class ResultsBar(QWidget):
    """``say(role, text)`` reports to the chat (info or error)."""

    def __init__(self, iface: QgisInterface, say: Callable[[str, str], None],
                 open_settings: Callable[[], None], parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.say = say
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        for text, tip, slot, name in (
                ("Export...", "Export the detections of the current result layer (Shapefile, "
                 "GeoPackage or GeoJSON)", self.export_current, "GeoChatExport"),
                ("Export all", "Export every result layer into one GeoPackage",
                 self.export_everything, "GeoChatExportAll"),
                ("Settings...", "GeoChat's settings", open_settings, "GeoChatSettings")):
            button = QToolButton(self)  # no push button's minimum width: fits a narrow dock
            button.setText(text)
            button.setToolTip(tip)
            button.setObjectName(name)
            button.clicked.connect(slot)
            row.addWidget(button)
        row.addStretch(1)

    def current_result_layer(self) -> Optional[QgsVectorLayer]:
        """The active layer when it is a result layer, else the newest result layer."""
        layers = result_layers(QgsProject.instance())
        active = self.iface.activeLayer()
        return active if active in layers else (layers[0] if layers else None)

    def export_current(self, _checked: bool = False, path: Optional[Path] = None) -> Optional[Path]:
        layer = self.current_result_layer()
        if layer is None:
            self.say("error", "There is no result layer to export yet: run a detection first.")
            return None
        if path is None:
            start = default_export_folder(QgsProject.instance()) / f"{safe_layer_name(layer.name())}.gpkg"
            chosen, _ = QFileDialog.getSaveFileName(self, "Export detections", str(start), FILTERS)
            if not chosen:
                return None
            path = Path(chosen)
        try:
            written = export_layer(layer, path)
        except GeoChatError as exc:
            self.say("error", str(exc))
            return None
        self.say("info", f"Exported {layer.featureCount()} detection(s) of '{layer.name()}' to {written}")
        return written

    def export_everything(self, _checked: bool = False, path: Optional[Path] = None) -> Optional[Path]:
        path = path or default_export_folder(QgsProject.instance()) / ALL_RESULTS_FILE
        try:
            names = export_all(QgsProject.instance(), path)
        except GeoChatError as exc:
            self.say("error", str(exc))
            return None
        if not names:
            self.say("error", "There is no result layer to export yet: run a detection first.")
            return None
        self.say("info", f"Exported {len(names)} result layer(s) to {path}")
        return path
