"""The GeoChat chat dock: follows the active raster layer; ask, find, identify, preview, run.

Everything the model does runs in the runtime child through ``geochat_qgis.client``: this
module, like all of QGIS's side, imports only QGIS, Qt and the standard library. Until the
runtime is installed the dock says what is missing and offers one button for the installer.
The dock's widgets are in dock_widgets.py, its model part in dock_model.py, its runs in
dock_runs.py and its chat links in dock_chat.py.
"""
from __future__ import annotations

from typing import Any, Optional

from qgis.core import QgsGeometry, QgsMapLayer, QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer
from qgis.gui import QgisInterface, QgsDockWidget, QgsMapToolExtent
from qgis.PyQt.QtWidgets import QWidget

from ..toolbelt.settings import PluginSettings
from . import area as areas
from .chat_history import load_history
from .dock_chat import ChatMixin
from .dock_model import ModelMixin
from .dock_runs import RunsMixin
from .dock_widgets import build_widgets
from .layer_summary import describe_layer, raster_or_none
from .map_tools import RegionMapTool
from .run_task import GeoChatTask
from .runner import Runner
from .tile_preview import TilePreview

PLACEHOLDERS = {
    "chat": "Ask anything about the area, e.g. Describe this image.",
    "vqa": "A question with a short answer, e.g. Is there a road?",
    "classify": "Optional question; fill the classes below",
    "refer": "What to find, one phrase (e.g. airplane); several separated by ';'",
    "grounding": "What to describe (e.g. Describe the image in detail)",
    "segment": "What to segment (e.g. the buildings)",
    "identify": "Draw a region with the region tool, then ask (optional text)",
}


class GeoChatDock(RunsMixin, ModelMixin, ChatMixin, QgsDockWidget):
    """Dock widget; ``layer`` is the raster being discussed (None when there is none)."""

    def __init__(self, iface: QgisInterface, parent: Optional[QWidget] = None) -> None:
        super().__init__("GeoChat", parent)
        self.setObjectName("GeoChatDock")
        self.iface = iface
        self.layer: Optional[QgsRasterLayer] = None
        self.settings = PluginSettings.load()
        self.runner = Runner()
        self.preview = TilePreview(iface.mapCanvas())
        self.drawn_rectangle: Optional[QgsRectangle] = None
        self.region: Optional[QgsGeometry] = None
        self.rectangle_tool = QgsMapToolExtent(iface.mapCanvas())
        self.rectangle_tool.extentChanged.connect(self._on_rectangle)
        self.region_tool = RegionMapTool(iface.mapCanvas())
        self.region_tool.regionDrawn.connect(self._on_region)
        self._watched_layers: set[str] = set()
        self.aoi_layer: Optional[QgsVectorLayer] = None
        self._server_check: Optional[GeoChatTask] = None
        self._runtime_check: Optional[GeoChatTask] = None
        self._deps_dialog = None
        self._model_list: Optional[GeoChatTask] = None
        self.setWidget(build_widgets(self))
        self._on_task_changed()
        self._follow_model_family()
        self.refresh_runtime()
        self.refresh_model_status()
        self.iface.currentLayerChanged.connect(self.set_layer)
        QgsProject.instance().readProject.connect(self._reload_history)
        self.set_layer(self.iface.activeLayer())

    # ------------------------------------------------------------------ state
    @property
    def task_name(self) -> str:
        return self.task_combo.currentData()

    def set_layer(self, layer: Optional[QgsMapLayer]) -> None:
        """Follow the active layer: a raster becomes the subject, anything else shows a hint.

        The last active polygon layer is where "selected polygons" come from.
        """
        if isinstance(layer, QgsVectorLayer):
            self.aoi_layer = layer
        self.layer = raster_or_none(layer)
        self.layer_label.setText(describe_layer(layer))
        self.chat.set_messages(load_history(QgsProject.instance(), self.layer.id()) if self.layer else [])
        self._update_enabled()

    def layer_summary(self) -> str:
        return self.layer_label.text()

    def _update_enabled(self) -> None:
        running = self.runner.busy
        ready = self.layer is not None and not running
        for widget in (self.send_button, self.prompt_edit, self.preview_button):
            widget.setEnabled(ready)
        self.cancel_button.setEnabled(running)

    def _on_task_changed(self, *_args: Any) -> None:
        task = self.task_name
        self.prompt_edit.setPlaceholderText(PLACEHOLDERS[task])
        self.classes_edit.setVisible(task == "classify")
        self.region_button.setEnabled(task == "identify")
        self.area_combo.setEnabled(task != "identify")

    # ------------------------------------------------------------------ area
    def current_area(self) -> areas.Area:
        choice = self.area_combo.currentData()
        if choice == areas.CANVAS:
            return areas.canvas_area(self.iface.mapCanvas())
        if choice == areas.LAYER:
            return areas.layer_area(self.layer)
        if choice == areas.RECTANGLE:
            return areas.rectangle_area(self.drawn_rectangle, self._canvas_crs(), "drawn rectangle")
        return areas.selection_area(self.aoi_layer)

    def _canvas_crs(self):
        return self.iface.mapCanvas().mapSettings().destinationCrs()

    def _on_rectangle(self, rect: QgsRectangle) -> None:
        self.drawn_rectangle = QgsRectangle(rect)
        self.area_combo.setCurrentIndex(self.area_combo.findData(areas.RECTANGLE))
        self.iface.mapCanvas().unsetMapTool(self.rectangle_tool)

    def _on_region(self, geometry: QgsGeometry) -> None:
        self.region = QgsGeometry(geometry)
        self.task_combo.setCurrentIndex(self.task_combo.findData("identify"))
        self.chat.add("info", "Region drawn: ask about it (or press Send).")

    # ------------------------------------------------------------------ teardown
    def cleanup(self) -> None:
        """Stop work and disconnect from QGIS before the dock is deleted."""
        self.runner.close()
        for pending in (self._runtime_check, self._server_check, self._model_list):
            try:
                pending.resultReady.disconnect()
            except (AttributeError, RuntimeError, TypeError):
                pass  # none, finished and gone, or never connected
        if self._deps_dialog is not None:
            self._deps_dialog.close()  # cancels a running install
            self._deps_dialog = None
        self.preview.clear()
        self.region_tool.clear()
        canvas = self.iface.mapCanvas()
        for tool in (self.rectangle_tool, self.region_tool):
            if canvas.mapTool() is tool:
                canvas.unsetMapTool(tool)
        for signal, slot in ((self.iface.currentLayerChanged, self.set_layer),
                             (QgsProject.instance().readProject, self._reload_history)):
            try:
                signal.disconnect(slot)
            except TypeError:
                pass
