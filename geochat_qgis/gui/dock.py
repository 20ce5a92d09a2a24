"""The GeoChat chat dock: follows the active raster layer; ask, find, identify, preview, run."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Optional

from qgis.core import (
    Qgis,
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
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.chat import ChatReply, ChatRequest, overview_plan
from ..core.errors import GeoChatError
from ..core.pipeline import Job, JobResult
from ..core.tiling import TileSpec, plan_tiles
from ..core.weights.demo import DEMO_NAME
from ..toolbelt.settings import DEFAULT_SECONDS_PER_TILE, PluginSettings, load_speed, save_speed
from . import area as areas
from .chat_history import load_history, model_history, save_history
from .chat_view import ChatView
from .deps_check import missing_for
from .layer_summary import describe_layer, raster_or_none
from .map_tools import RegionMapTool
from .model_choice import (
    MISSING,
    NEEDS_GPU,
    NOT_FOUND,
    SERVER,
    UNREACHABLE,
    backend_spec,
    check_server,
    model_choices,
    model_status,
)
from .result_layers import add_result_layer, results_folder, write_result_file
from .results_bar import ResultsBar
from .run_task import GeoChatTask
from .runner import Runner
from .tile_preview import TilePreview, describe_estimate, estimate_seconds, human_duration

log = logging.getLogger(__name__)

# (task, label in the picker, runs over every tile of the area)
TASKS = (
    ("chat", "Ask / caption", False),
    ("vqa", "Question, short answer (VQA)", False),
    ("classify", "Classify the scene", False),
    ("refer", "Find objects [refer]", True),
    ("grounding", "Describe with boxes [grounding]", True),
    ("segment", "Segment (GeoPixel)", True),
    ("identify", "Identify a region [identify]", False),
)
TILED = {task for task, _label, tiled in TASKS if tiled}
DEMO_SECONDS_PER_TILE = 1.0
PLACEHOLDERS = {
    "chat": "Ask anything about the area, e.g. Describe this image.",
    "vqa": "A question with a short answer, e.g. Is there a road?",
    "classify": "Optional question; fill the classes below",
    "refer": "What to find, one phrase (e.g. airplane); several separated by ';'",
    "grounding": "What to describe (e.g. Describe the image in detail)",
    "segment": "What to segment (e.g. the buildings)",
    "identify": "Draw a region with the region tool, then ask (optional text)",
}


class GeoChatDock(QgsDockWidget):
    """Dock widget; ``layer`` is the raster being discussed (None when there is none)."""

    def __init__(self, iface: QgisInterface, parent: Optional[QWidget] = None) -> None:
        super().__init__("GeoChat", parent)
        self.setObjectName("GeoChatDock")
        self.iface = iface
        self.layer: Optional[QgsRasterLayer] = None
        self.settings = PluginSettings.load()
        self.runner = Runner(lambda: self.settings.runtime)
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
        self.layer_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.layer_label)

        model_row = QHBoxLayout()
        self.model_combo = QComboBox(body)
        self.model_combo.setObjectName("GeoChatModel")
        for choice in model_choices():
            self.model_combo.addItem(choice.title, choice.key)
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
        self.download_button = QPushButton("Download", body)
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
        self.refresh_model_status()

    def _on_backend_chosen(self, _index: int) -> None:
        self.settings.backend = self.backend_combo.currentData()
        self.settings.save()
        self.refresh_model_status()

    def open_settings(self) -> None:
        from .settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.settings, self)
        if dialog.exec_():
            self.backend_combo.setCurrentIndex(max(0, self.backend_combo.findData(self.settings.backend)))
            if not self.runner.busy:
                self.runner.cache.clear()  # a changed runtime or device loads afresh
            self.refresh_model_status()

    def refresh_model_status(self) -> None:
        try:
            status, sentence = model_status(self.model_combo.currentData() or "", self.settings)
        except GeoChatError as exc:
            status, sentence = NOT_FOUND, str(exc)
        self._show_status(status, sentence)
        self.download_button.setVisible(status == MISSING)
        if status == SERVER:
            self._check_server()

    def _show_status(self, status: str, sentence: str) -> None:
        colour = "#b00020" if status in (MISSING, NEEDS_GPU, NOT_FOUND, UNREACHABLE) else "#2e7d32"
        self.status_label.setText(f'<span style="color:{colour}">{status}</span>: {sentence}')

    def _check_server(self) -> None:
        """Ask the server for its models in the background; the status line follows."""
        try:
            spec = backend_spec(self.model_combo.currentData() or "", self.settings, self._api_key())
        except GeoChatError as exc:
            self._show_status(UNREACHABLE, str(exc))
            return
        self._server_check = GeoChatTask("GeoChat: checking the server",
                                         lambda _cancel, _token, _progress: check_server(spec))
        self._server_check.resultReady.connect(lambda result: self._show_status(*result))
        QgsApplication.taskManager().addTask(self._server_check)

    def download_model(self) -> None:
        """Fetch the chosen catalog model in a task, with progress; the status follows."""
        name = self.model_combo.currentData()
        if not name or self.runner.busy:
            return
        cache = self.settings.cache_dir or None

        def work(cancel, _on_token, on_progress):
            from ..core.weights.catalog import load_catalog
            from ..core.weights.store import download_model

            entry = load_catalog().get(name)
            # permille: byte counts overflow the signal's int past 2 GB
            return download_model(entry, cache, cancel=cancel,
                                  progress=lambda done, total: on_progress(
                                      int(1000 * done / total) if total else 0, 1000))

        task = self.runner.start(f"GeoChat: downloading {name}", work)
        task.tileProgress.connect(lambda done, total: self.progress.setValue(done // 10))
        task.resultReady.connect(lambda folder: self.chat.add("info", f"Downloaded {name} to {folder}"))
        task.failed.connect(lambda message: self.chat.add("error", message))
        task.taskCompleted.connect(self.refresh_model_status)
        task.taskTerminated.connect(self.refresh_model_status)
        self.progress.setValue(0)
        self.chat.add("info", f"Downloading {name}...")

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

    # ------------------------------------------------------------------ preview
    def tile_spec(self) -> TileSpec:
        return TileSpec(tile_size=self.settings.tile_size, overlap=self.settings.overlap,
                        gsd=self.settings.gsd or None)

    def prompts(self) -> list[str]:
        text = self.prompt_edit.text().strip()
        if self.task_name == "refer":
            return [p.strip() for p in text.split(";") if p.strip()]
        return [text] if text else []

    def show_preview(self) -> None:
        """Plan the tiles in the background and draw the grid with a time estimate."""
        self._plan(then=None)

    def send(self) -> None:
        """Plan (worker), confirm long runs (main thread), then run (worker)."""
        if self.layer is None or self.runner.busy:
            return
        self._plan(then=self._run_planned)

    def _plan(self, then: Optional[Callable[[Optional[areas.Area], Any], None]]) -> None:
        """Everything slow (reading the raster, reprojecting, resolving the model, building the
        demo model) runs in a task; the main thread only gathers what the widgets say."""
        if self.layer is None or self.runner.busy:
            return
        task_name = self.task_name
        try:
            area = None if task_name == "identify" else self.current_area()
            api_key = self._api_key() if then else None
        except GeoChatError as exc:
            self._report_plan_problem(str(exc), then)
            return
        tiled = task_name in TILED
        spec = self.tile_spec() if tiled else replace(self.tile_spec(), overlap=0.0)
        raster, settings = self.layer.source(), replace(self.settings)
        model_key = self.model_combo.currentData() or self.settings.model
        prompts = len(self.prompts()) if tiled else 1

        def work(_cancel, _on_token, _on_progress):
            plan = None
            if area is not None and tiled:
                plan = plan_tiles(raster, spec, extent=area.extent, extent_crs=area.crs, aoi=area.aoi)
            elif area is not None:  # a question is asked about one (overview) tile of the area
                plan, _how = overview_plan(raster, spec, area.extent, area.crs, area.aoi)
            if then is None:
                return plan, None, None
            missing = missing_for(settings.backend, settings.runtime, settings.device)
            return plan, backend_spec(model_key, settings, api_key), missing

        def planned(result) -> None:
            plan, backend, missing = result
            if missing is not None and not self._install_dependencies(settings.backend):
                return
            seconds = 0.0
            if plan is not None:
                self.preview.show(plan)
                seconds = estimate_seconds(len(plan), prompts, self._seconds_per_tile(model_key))
                self.preview_label.setText(describe_estimate(len(plan), seconds))
            if then is not None:
                if seconds > self.settings.ask_above_seconds and not self._confirm_long(seconds):
                    return
                then(area, backend)

        task = self.runner.start("GeoChat: planning tiles", work)
        task.resultReady.connect(planned)
        task.failed.connect(lambda message: self._report_plan_problem(message, then))
        task.taskCompleted.connect(self._update_enabled)
        task.taskTerminated.connect(self._update_enabled)
        self._update_enabled()

    def _install_dependencies(self, backend: str) -> bool:
        """The backend's packages are missing: offer the installer; True once installed."""
        from .deps_dialog import DepsDialog

        if DepsDialog(backend, self, device=self.settings.device).exec_() != QDialog.Accepted:
            self.chat.add("error", f"The {backend} backend's packages are not installed: install "
                                   "them (Plugins > GeoChat > Install model dependencies...) or "
                                   "choose another backend.")
            return False
        self.runner.cache.clear()  # a runtime started before the install must not be reused
        return True

    def _report_plan_problem(self, message: str, then) -> None:
        self.preview_label.setText(message)
        if then is not None:
            self.chat.add("error", message)

    def _run_planned(self, area: Optional[areas.Area], spec) -> None:
        try:
            if self.task_name in TILED:
                self._start_detect(spec, area)
            else:
                self._start_chat(spec, area)
        except GeoChatError as exc:
            self.chat.add("error", str(exc))
        self._update_enabled()

    @staticmethod
    def _seconds_per_tile(model_key: str) -> float:
        """Measured for this model, else a guess: the demo model is tiny, real ones are 7B."""
        return load_speed(model_key, DEMO_SECONDS_PER_TILE if model_key == DEMO_NAME else DEFAULT_SECONDS_PER_TILE)

    def _confirm_long(self, seconds: float) -> bool:
        answer = QMessageBox.question(
            self, "GeoChat", f"This run is estimated to take {human_duration(seconds)}. Start it?")
        return answer == QMessageBox.Yes

    def _api_key(self) -> Optional[str]:
        if self.settings.backend != "openai" or not self.settings.auth_config_id:
            return None
        from ..toolbelt.auth import api_key_from_auth_manager

        return api_key_from_auth_manager(self.settings.auth_config_id)

    def _output_crs(self) -> str:
        """Results go in the project CRS (the raster's while the project has none)."""
        crs = QgsProject.instance().crs()
        return areas.crs_wkt(crs if crs.isValid() else self.layer.crs())

    def _start_chat(self, spec, area: Optional[areas.Area]) -> None:
        question = self.prompt_edit.text().strip()
        task = self.task_name
        region = region_crs = None
        if task == "identify":
            if self.region is None:
                raise GeoChatError("draw the region first: press Region, click its corners, right click")
            region, region_crs = areas.qgs_to_shapely(self.region), areas.crs_wkt(self._canvas_crs())
        classes = [c.strip() for c in self.classes_edit.text().split(",") if c.strip()]
        request = ChatRequest(
            self.layer.source(), question, task=task, family=spec.family,
            extent=area.extent if area else None, extent_crs=area.crs if area else None,
            history=model_history(self.chat.messages), region=region, region_crs=region_crs,
            classes=classes, output_crs=self._output_crs(),
            max_new_tokens=self.settings.max_new_tokens,
            family_settings=self._family_settings(spec.family),
        )
        self.chat.add("user", question or f"[{task}]")
        run = self.runner.start_chat(request, spec, self._result_writer(
            lambda reply: (reply.answer.detections, reply.crs, f"GeoChat {reply.user_text[:40]}")))
        self._wire(run)
        self.chat.begin_stream()

    def _start_detect(self, spec, area: areas.Area) -> None:
        prompts = self.prompts()
        if not prompts and self.task_name != "grounding":
            raise GeoChatError("type what to find (one phrase, or several separated by ';')")
        job = Job(
            raster=self.layer.source(), task=self.task_name, prompts=prompts, family=spec.family,
            extent=area.extent, extent_crs=area.crs, aoi=area.aoi, tile_spec=self.tile_spec(),
            backend=spec, output_crs=self._output_crs(), max_new_tokens=self.settings.max_new_tokens,
            grammar=self.settings.grammar and spec.kind == "llama.cpp" and self.task_name == "refer",
            iou_threshold=self.settings.iou_threshold,
            family_settings=self._family_settings(spec.family),
        )
        self.chat.add("user", f"[{self.task_name}] {'; '.join(prompts)} over the {area.description}")
        task_name = self.task_name
        run = self.runner.start_detect(job, spec, self._result_writer(
            lambda result: (result.detections, result.crs,
                            f"GeoChat {task_name}: {'; '.join(prompts)[:40]} ({result.run_id[:6]})"),
            always=True))
        self._wire(run)
        self.progress.setValue(0)

    def _family_settings(self, family: str) -> dict:
        return {"angle_convention": self.settings.angle_convention} if family == "geochat" else {}

    def _wire(self, run) -> None:
        layer_id = self.layer.id()
        run.tokenReceived.connect(self.chat.append_token)
        run.tileProgress.connect(lambda done, total: self.progress.setValue(int(100 * done / max(1, total))))
        run.resultReady.connect(lambda result: self._on_result(layer_id, result))
        run.failed.connect(lambda message: self._on_failed(layer_id, message))
        run.taskCompleted.connect(self._update_enabled)
        run.taskTerminated.connect(self._update_enabled)

    def _on_failed(self, layer_id: str, message: str) -> None:
        self.chat.end_stream()
        self.chat.add("error", message)
        self.iface.messageBar().pushMessage("GeoChat", message, Qgis.Warning, 8)
        log.warning("%s", message)
        self._save(layer_id)
        self._update_enabled()

    def _on_result(self, layer_id: str, result: Any) -> None:
        """Main thread: add the layer, write the answer, keep the history."""
        self.chat.end_stream()
        value, written = result
        if isinstance(value, ChatReply):
            self._show_reply(value, written)
        elif isinstance(value, JobResult):
            self._show_job(value, written)
        self._save(layer_id)
        self._update_enabled()

    def _result_writer(self, what: Callable[[Any], tuple], always: bool = False):
        """A worker-side step writing the run's detections to their own GeoPackage; the main
        thread then only opens it. Gives ``(result, (path, name) or None)``."""
        folder = results_folder(QgsProject.instance())  # read here, on the main thread

        def finish(result):
            detections, crs, name = what(result)
            if not detections and not always:
                return result, None
            return result, (write_result_file(detections, crs, name, folder), name)

        return finish

    def _open_layer(self, written, detections) -> Optional[QgsVectorLayer]:
        if written is None:
            return None
        path, name = written
        masks = bool(detections) and all(d.kind == "mask" for d in detections)
        layer = add_result_layer(path, name, [d.label for d in detections], masks)
        self._watch(layer)
        return layer

    def _show_reply(self, reply: ChatReply, written) -> None:
        layer = self._open_layer(written, reply.answer.detections)
        self.chat.add("assistant", reply.answer.text or reply.answer.raw, raw=reply.answer.raw,
                      user_text=reply.user_text, layer_id=layer.id() if layer else None,
                      counts=_counts(reply.answer.detections))
        self.chat.add("info", f"(looked at {reply.how}; {reply.generated_tokens} tokens in {reply.seconds:.1f} s)")

    def _show_job(self, result: JobResult, written) -> None:
        layer = self._open_layer(written, result.detections)
        prompts = max(1, len({a.prompt for a in result.answers}))
        if result.tiles_done:
            save_speed(self.model_combo.currentData() or self.settings.model,
                       result.seconds / (result.tiles_done * prompts))
        status = "cancelled, results so far kept" if result.cancelled else (
            f"stopped: {result.error}" if result.error else "done")
        text = (f"Found {len(result.detections)} object(s) in {result.tiles_done} of "
                f"{result.tiles_planned} tile(s) in {result.seconds:.1f} s ({status}).")
        if result.failures:
            text += f" {len(result.failures)} tile(s) failed: {result.failures[0].message}"
        self.chat.add("assistant", text, layer_id=layer.id(), counts=_counts(result.detections))
        self.progress.setValue(100)

    def _save(self, layer_id: str) -> None:
        if self.layer is not None and self.layer.id() == layer_id:
            save_history(QgsProject.instance(), layer_id, self.chat.messages)

    def _reload_history(self, *_args: Any) -> None:
        self.set_layer(self.iface.activeLayer())

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


def _counts(detections) -> dict[str, int]:
    counts: dict[str, int] = {}
    for detection in detections:
        counts[detection.label] = counts.get(detection.label, 0) + 1
    return counts


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
