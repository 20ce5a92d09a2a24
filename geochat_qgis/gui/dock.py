"""The GeoChat chat dock: follows the active raster layer; ask, find, identify, preview, run.

Everything the model does runs in the runtime child through ``geochat_qgis.client``: this
module, like all of QGIS's side, imports only QGIS, Qt and the standard library. Until the
runtime is installed the dock says what is missing and offers one button for the installer.
"""
from __future__ import annotations

from typing import Any, Optional

from qgis.core import (
    QgsApplication,
    QgsFeatureRequest,
    QgsGeometry,
    QgsMapLayer,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgisInterface, QgsDockWidget, QgsMapToolExtent
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..client import (RuntimeState, close_shared_client, runtime_command, runtime_state,
                      shared_client)
from ..core.errors import GeoChatError  # stdlib only
from ..toolbelt.settings import PluginSettings
from . import area as areas
from .chat_history import load_history
from .chat_view import ChatView
from .deps_dialog import DepsDialog
from .dock_runs import TASKS, RunsMixin
from .get_model_dialog import open_get_dialog
from .layer_summary import describe_layer, raster_or_none
from .map_tools import RegionMapTool
from .model_choice import (
    CHECKING,
    MISSING,
    NEEDS_GPU,
    NOT_FOUND,
    SERVER,
    UNREACHABLE,
    backend_for,
    check_server,
    fetch_rows,
    model_choices,
    remember_rows,
    model_status,
)
from .results_bar import ResultsBar
from .run_task import GeoChatTask
from .runner import Runner
from .settings_dialog import SettingsDialog
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


class GeoChatDock(RunsMixin, QgsDockWidget):
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
        self._build_ui()
        self.iface.currentLayerChanged.connect(self.set_layer)
        QgsProject.instance().readProject.connect(self._reload_history)
        self.set_layer(self.iface.activeLayer())

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        body = QWidget(self)
        layout = QVBoxLayout(body)
        self.layer_label = QLabel(body)
        self.layer_label.setObjectName("GeoChatLayerLabel")
        self.layer_label.setWordWrap(True)
        self.layer_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.layer_label)

        runtime_row = QHBoxLayout()
        self.runtime_label = QLabel(body)
        self.runtime_label.setObjectName("GeoChatRuntimeStatus")
        self.runtime_label.setWordWrap(True)
        self.runtime_button = QPushButton("Install the runtime...", body)
        self.runtime_button.setObjectName("GeoChatInstallRuntime")
        self.runtime_button.setToolTip("Install GeoChat's runtime (the core packages and the "
                                       "chosen backend) into its own environment; QGIS's "
                                       "Python is not changed")
        self.runtime_button.clicked.connect(self.install_runtime)
        runtime_row.addWidget(self.runtime_label, 1)
        runtime_row.addWidget(self.runtime_button)
        layout.addLayout(runtime_row)
        self.runtime_label.setVisible(False)
        self.runtime_button.setVisible(False)

        model_row = QHBoxLayout()
        self.model_combo = QComboBox(body)
        self.model_combo.setObjectName("GeoChatModel")
        for choice in model_choices():
            self.model_combo.addItem(choice.title, choice.key)
            self.model_combo.setItemData(self.model_combo.count() - 1, choice.note,
                                         Qt.ItemDataRole.ToolTipRole)
        self.model_combo.addItem("Model file or folder...", "")
        if self.settings.model and self.model_combo.findData(self.settings.model) < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, self.settings.model, self.settings.model)
        if self.settings.model:
            self.model_combo.setCurrentIndex(max(0, self.model_combo.findData(self.settings.model)))
        self.model_combo.activated.connect(self._on_model_chosen)
        self.backend_combo = QComboBox(body)
        self.backend_combo.setObjectName("GeoChatBackend")
        for kind in ("llama.cpp", "transformers", "openai"):
            self.backend_combo.addItem(kind, kind)
        self.backend_combo.setCurrentIndex(max(0, self.backend_combo.findData(self.settings.backend)))
        self.backend_combo.activated.connect(self._on_backend_chosen)
        model_row.addWidget(QLabel("Model", body))
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.backend_combo)
        layout.addLayout(model_row)
        status_row = QHBoxLayout()
        self.status_label = QLabel(body)
        self.status_label.setObjectName("GeoChatModelStatus")
        self.status_label.setWordWrap(True)
        self.download_button = QPushButton("Get...", body)
        self.download_button.setObjectName("GeoChatDownload")
        self.download_button.clicked.connect(self.download_model)
        status_row.addWidget(self.status_label, 1)
        status_row.addWidget(self.download_button)
        layout.addLayout(status_row)

        task_row = QHBoxLayout()
        self.task_combo = QComboBox(body)
        self.task_combo.setObjectName("GeoChatTask")
        for task, label, _tiled in TASKS:
            self.task_combo.addItem(label, task)
        self.task_combo.setCurrentIndex(self.task_combo.findData("refer"))
        self.task_combo.currentIndexChanged.connect(self._on_task_changed)
        self.area_combo = QComboBox(body)
        self.area_combo.setObjectName("GeoChatArea")
        for key, label in areas.CHOICES.items():
            self.area_combo.addItem(label, key)
        self.draw_button = QPushButton("Draw", body)
        self.draw_button.setToolTip("Draw the rectangle to run on")
        self.draw_button.clicked.connect(lambda: self.iface.mapCanvas().setMapTool(self.rectangle_tool))
        self.region_button = QPushButton("Region", body)
        self.region_button.setToolTip("Draw the region to identify: click vertices, right click to close")
        self.region_button.clicked.connect(lambda: self.iface.mapCanvas().setMapTool(self.region_tool))
        task_row.addWidget(self.task_combo, 1)
        task_row.addWidget(self.area_combo, 1)
        task_row.addWidget(self.draw_button)
        task_row.addWidget(self.region_button)
        layout.addLayout(task_row)
        self.classes_edit = QLineEdit(body)
        self.classes_edit.setPlaceholderText("Classes, comma separated (e.g. forest, residential, river)")
        layout.addWidget(self.classes_edit)

        self.chat = ChatView(body)
        self.chat.phraseClicked.connect(self.select_phrase)
        layout.addWidget(self.chat, 1)

        prompt_row = QHBoxLayout()
        self.prompt_edit = QLineEdit(body)
        self.prompt_edit.setObjectName("GeoChatPrompt")
        self.prompt_edit.returnPressed.connect(self.send)
        self.send_button = QPushButton("Send", body)
        self.send_button.setObjectName("GeoChatSend")
        self.send_button.clicked.connect(self.send)
        self.cancel_button = QPushButton("Cancel", body)
        self.cancel_button.setObjectName("GeoChatCancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.runner.cancel)
        prompt_row.addWidget(self.prompt_edit, 1)
        prompt_row.addWidget(self.send_button)
        prompt_row.addWidget(self.cancel_button)
        layout.addLayout(prompt_row)

        bottom_row = QHBoxLayout()
        self.preview_button = QPushButton("Preview tiles", body)
        self.preview_button.clicked.connect(self.show_preview)
        self.preview_label = QLabel(body)
        self.progress = QProgressBar(body)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        bottom_row.addWidget(self.preview_button)
        bottom_row.addWidget(self.preview_label, 1)
        bottom_row.addWidget(self.progress, 1)
        layout.addLayout(bottom_row)
        self.results_bar = ResultsBar(self.iface, self.chat.add, self.open_settings, body)
        layout.addWidget(self.results_bar)
        self.setWidget(body)
        self._on_task_changed()
        self._follow_model_family()
        self.refresh_runtime()
        self.refresh_model_status()

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

    def _on_model_chosen(self, index: int) -> None:
        key = self.model_combo.itemData(index)
        if key == "":
            path, _ = QFileDialog.getOpenFileName(self, "GeoChat model (GGUF, or config.json of a "
                                                  "checkpoint folder)", "", "Models (*.gguf *.json)")
            if not path:
                return
            key = path[:-len("/config.json")] if path.endswith("/config.json") else path
            self.model_combo.insertItem(index, key, key)
            self.model_combo.setCurrentIndex(index)
        self.settings.model = key
        self.settings.save()
        self._follow_model_family()
        self.refresh_runtime()
        self.refresh_model_status()

    def _on_backend_chosen(self, _index: int) -> None:
        self.settings.backend = self.backend_combo.currentData()
        self.settings.save()
        self.refresh_runtime()
        self.refresh_model_status()

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self)
        if dialog.exec():
            self.backend_combo.setCurrentIndex(max(0, self.backend_combo.findData(self.settings.backend)))
            self.refresh_runtime()
            self.refresh_model_status()

    # ------------------------------------------------------------------ runtime
    def refresh_runtime(self) -> None:
        """Say whether the runtime can run the chosen backend: at once when none is installed,
        else after a short probe of its interpreter in the background (no child started)."""
        if runtime_command() is None:
            self.show_runtime(RuntimeState(False, None, [], ""))
            return
        backend = backend_for(self.model_key(), self.settings)

        def probe(_cancel, _token, _progress):
            return runtime_state(backend=backend)

        self._runtime_check = GeoChatTask("GeoChat: checking the runtime", probe, quiet=True)
        self._runtime_check.resultReady.connect(self.show_runtime)
        QgsApplication.taskManager().addTask(self._runtime_check)

    def show_runtime(self, state: Any) -> None:
        """Show a runtime state (client.RuntimeState): nothing when ready, else what is missing
        and the install button."""
        if state.ready:
            self.runtime_ready()
            return
        backend = backend_for(self.model_key(), self.settings)
        if state.python is None:
            text = (f"The GeoChat runtime is not installed. It holds the model packages (the "
                    f"core and the {backend} backend) in an environment of its own, outside "
                    "QGIS's Python: install it once with the button.")
        else:
            missing = ", ".join(state.missing) or "its packages"
            text = (f"The GeoChat runtime lacks {missing} for the {backend} backend: install "
                    "them with the button.")
        self.runtime_label.setText(f'<span style="color:#b00020">{text}</span>')
        self.runtime_label.setToolTip(state.message)
        self.runtime_label.setVisible(True)
        self.runtime_button.setVisible(True)

    def runtime_ready(self) -> None:
        self.runtime_label.setVisible(False)
        self.runtime_button.setVisible(False)

    def install_runtime(self) -> None:
        """Open the installer for the chosen backend (core packages + backend, into the managed
        environment); the runtime line follows once it closes."""
        if self._deps_dialog is not None and self._deps_dialog.isVisible():
            self._deps_dialog.raise_()
            return
        self._deps_dialog = DepsDialog(backend_for(self.model_key(), self.settings), self,
                                       device=self.settings.device)
        self._deps_dialog.finished.connect(self._on_installer_closed)
        self._deps_dialog.open()

    def _on_installer_closed(self, _result: int) -> None:
        dialog = self._deps_dialog
        if dialog is not None and dialog.installed:
            self.on_runtime_installed()
        self.refresh_runtime()
        self.refresh_model_status()

    def on_runtime_installed(self) -> None:
        """After an install (this dock's button or the plugin menu): a child started before it
        is not reused, and the models are listed afresh."""
        if not self.runner.busy:
            close_shared_client()
        remember_rows([])

    # ------------------------------------------------------------------ model
    def refresh_model_status(self) -> None:
        try:
            status, sentence = model_status(self.model_combo.currentData() or "", self.settings)
        except GeoChatError as exc:
            status, sentence = NOT_FOUND, str(exc)
        self._show_status(status, sentence)
        self.download_button.setVisible(status == MISSING)
        if status == SERVER:
            self._check_server()
        elif status == CHECKING:
            self._fetch_models()

    def _fetch_models(self) -> None:
        """Ask the runtime for the model list in the background; the status line follows."""
        cache = self.settings.cache_dir
        self._model_list = GeoChatTask("GeoChat: listing models",
                                       lambda _cancel, _token, _progress: fetch_rows(shared_client(), cache),
                                       quiet=True)
        self._model_list.resultReady.connect(lambda _rows: self._on_models_listed())
        QgsApplication.taskManager().addTask(self._model_list)

    def _on_models_listed(self) -> None:
        """The runtime's list is in: each item says what runs it here; the status follows."""
        for choice in model_choices():
            index = self.model_combo.findData(choice.key)
            if index >= 0:
                self.model_combo.setItemData(index, choice.note, Qt.ItemDataRole.ToolTipRole)
        self.refresh_model_status()

    def _show_status(self, status: str, sentence: str) -> None:
        colour = "#b00020" if status in (MISSING, NEEDS_GPU, NOT_FOUND, UNREACHABLE) else "#2e7d32"
        self.status_label.setText(f'<span style="color:{colour}">{status}</span>: {sentence}')

    def _check_server(self) -> None:
        """Ask the server for its models in the background; the status line follows."""
        key, settings, api_key = self.model_combo.currentData() or "", self.settings, self._api_key()
        self._server_check = GeoChatTask("GeoChat: checking the server", lambda _cancel, _token, _progress:
                                         check_server(shared_client(), key, settings, api_key), quiet=True)
        self._server_check.resultReady.connect(lambda result: self._show_status(*result))
        QgsApplication.taskManager().addTask(self._server_check)

    def download_model(self) -> None:
        """Open the Get dialog for the chosen catalog model (download and convert in the
        runtime, with progress); the status follows once it is got."""
        name = self.model_combo.currentData()
        if name:
            self._get_dialog = open_get_dialog(name, self.settings.cache_dir, self, self._on_model_got)

    def _on_model_got(self, name: str) -> None:
        self.chat.add("info", f"{name} is ready.")
        remember_rows([])  # listed afresh: the status line follows
        self.refresh_model_status()

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

    # ------------------------------------------------------------------ phrase <-> feature
    def select_phrase(self, layer_id: str, label: str) -> None:
        """Select the features of ``label`` in the result layer and zoom to them."""
        layer = QgsProject.instance().mapLayer(layer_id)
        if not isinstance(layer, QgsVectorLayer):
            self.chat.add("info", "That result layer has been removed.")
            return
        expression = f'"label" = {_quote(label)}'
        ids = [f.id() for f in layer.getFeatures(QgsFeatureRequest().setFilterExpression(expression))]
        layer.selectByIds(ids)
        if ids:
            self.iface.mapCanvas().zoomToSelected(layer)
            self.iface.mapCanvas().flashFeatureIds(layer, ids)

    def _watch(self, layer: QgsVectorLayer) -> None:
        if layer.id() in self._watched_layers:
            return
        self._watched_layers.add(layer.id())
        layer.selectionChanged.connect(lambda *_: self._on_selection(layer))

    def _on_selection(self, layer: QgsVectorLayer) -> None:
        labels = {f["label"] for f in layer.getSelectedFeatures()}
        self.chat.highlight(layer.id(), labels)

    # ------------------------------------------------------------------ teardown
    def cleanup(self) -> None:
        """Stop work and disconnect from QGIS before the dock is deleted."""
        self.runner.close()
        for pending in (self._runtime_check, self._server_check, getattr(self, "_model_list", None)):
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


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
