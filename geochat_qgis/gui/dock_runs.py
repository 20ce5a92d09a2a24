"""The dock's runs: plan the tiles, confirm, run in the background, show the results.

Everything slow happens in QgsTasks (see runner.py): the main thread only reads the widgets
before a run and opens the result files after it. Mixed into GeoChatDock.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Optional

from qgis.core import Qgis, QgsProject, QgsVectorLayer
from qgis.PyQt.QtWidgets import QDialog, QMessageBox

from ..core.chat import ChatReply, ChatRequest, overview_plan
from ..core.errors import GeoChatError
from ..core.pipeline import Job, JobResult
from ..core.tiling import TileSpec, plan_tiles
from ..core.weights.demo import DEMO_NAME
from ..toolbelt.feature_detections import to_shapely
from ..toolbelt.settings import DEFAULT_SECONDS_PER_TILE, load_speed, save_speed
from . import area as areas
from .chat_history import model_history, save_history
from .deps_check import missing_for
from .model_choice import backend_spec
from .result_layers import add_result_layer, results_folder, write_result_file
from .tile_preview import describe_estimate, estimate_seconds, human_duration

log = logging.getLogger(__name__)

DEMO_SECONDS_PER_TILE = 1.0
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


class RunsMixin:
    """Planning, running and showing results; GeoChatDock provides the widgets it reads."""

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

        if DepsDialog(backend, self, device=self.settings.device).exec() != QDialog.DialogCode.Accepted:
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
        return answer == QMessageBox.StandardButton.Yes

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
            region, region_crs = to_shapely(self.region), areas.crs_wkt(self._canvas_crs())
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


def _counts(detections) -> dict[str, int]:
    counts: dict[str, int] = {}
    for detection in detections:
        counts[detection.label] = counts.get(detection.label, 0) + 1
    return counts
