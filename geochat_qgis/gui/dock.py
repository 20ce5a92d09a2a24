"""The GeoChat chat dock: follows the active raster layer."""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsMapLayer, QgsRasterLayer
from qgis.gui import QgisInterface, QgsDockWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QLabel, QVBoxLayout, QWidget

from .layer_summary import describe_layer, raster_or_none


class GeoChatDock(QgsDockWidget):
    """Dock widget; ``layer`` is the raster being discussed (None when there is none)."""

    def __init__(self, iface: QgisInterface, parent: Optional[QWidget] = None) -> None:
        super().__init__("GeoChat", parent)
        self.setObjectName("GeoChatDock")
        self.iface = iface
        self.layer: Optional[QgsRasterLayer] = None
        body = QWidget(self)
        layout = QVBoxLayout(body)
        self.layer_label = QLabel(body)
        self.layer_label.setObjectName("GeoChatLayerLabel")
        self.layer_label.setWordWrap(True)
        self.layer_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.layer_label)
        layout.addStretch(1)
        self.setWidget(body)
        self.iface.currentLayerChanged.connect(self.set_layer)
        self.set_layer(self.iface.activeLayer())

    def set_layer(self, layer: Optional[QgsMapLayer]) -> None:
        """Follow the active layer: a raster becomes the subject, anything else shows a hint."""
        self.layer = raster_or_none(layer)
        self.layer_label.setText(describe_layer(layer))

    def layer_summary(self) -> str:
        return self.layer_label.text()

    def cleanup(self) -> None:
        """Disconnect from QGIS before the dock is deleted."""
        try:
            self.iface.currentLayerChanged.disconnect(self.set_layer)
        except TypeError:
            pass
