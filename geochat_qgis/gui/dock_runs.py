"""The dock's runs: a request of the user's choices, planned, confirmed, run, shown.

The dock gathers its widgets into one plain JSON request (the runtime's, see
``geochat_qgis/client``); the runtime child plans the tiles, runs the job or answers the
question and writes the result GeoPackage. Every request runs in a QgsTask (runner.py); the
main thread only reads the widgets before and opens the result file after. Mixed into
GeoChatDock.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from qgis.core import Qgis, QgsProject, QgsVectorLayer
from qgis.PyQt.QtWidgets import QMessageBox

from ..client import runtime_state
from ..core.errors import GeoChatError  # stdlib only
from ..toolbelt.auth import api_key_from_auth_manager
from ..toolbelt.settings import DEFAULT_SECONDS_PER_TILE, load_speed, save_speed
from . import area as areas
from .chat_history import model_history
from .model_choice import DEMO_GEOPIXEL_NAME, DEMO_NAME, model_request
from .result_layers import RESULTS_TABLE, add_result_layer, result_path, results_folder
from .runner import client
from .tile_preview import ASK_ABOVE_TILES, describe_estimate, estimate_seconds, human_duration

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
Then = Callable[[dict, Optional[areas.Area]], None]


class RunsMixin:
    """Planning, running and showing results; GeoChatDock provides the widgets it reads."""

    # ------------------------------------------------------------------ the request
    def prompts(self) -> list[str]:
        text = self.prompt_edit.text().strip()
        if self.task_name == "refer":
            return [p.strip() for p in text.split(";") if p.strip()]
        return [text] if text else []

    def build_request(self, area: Optional[areas.Area], api_key: Optional[str] = None,
                      check: bool = True) -> dict[str, Any]:
        """The runtime request for the dock's choices (GeoChatError names what is missing
        when ``check``)."""
        task, settings = self.task_name, self.settings
        model = model_request(self.model_key(), settings, api_key)
        request: dict[str, Any] = {
            "raster": self.layer.source(), "task": task, "model": model,
            "tiling": {"tile_size": settings.tile_size or None, "overlap": settings.overlap,
                       "gsd": settings.gsd or None},
            "output": {"crs": self._output_crs()},
            "options": {"max_new_tokens": settings.max_new_tokens,
                        "iou_threshold": settings.iou_threshold,
                        "angle_convention": settings.angle_convention,
                        "grammar": bool(settings.grammar and task == "refer"
                                        and model.get("backend") == "llama.cpp")},
        }
        if area is not None:
            request.update(area.request())
        if task in TILED:
            request["prompts"] = self.prompts()
            if check and not request["prompts"] and task != "grounding":
                raise GeoChatError("type what to find (one phrase, or several separated by ';')")
            return request
        request.update(question=self.prompt_edit.text().strip(),
                       history=[list(turn) for turn in model_history(self.chat.messages)],
                       classes=[c.strip() for c in self.classes_edit.text().split(",") if c.strip()])
        if task == "identify":
            if self.region is None:
                if check:
                    raise GeoChatError("draw the region first: press Region, click its corners, "
                                       "right click")
            else:
                request.update(region_wkt=self.region.asWkt(),
                               region_crs=areas.crs_wkt(self._canvas_crs()))
        return request

    # ------------------------------------------------------------------ preview
    def show_preview(self) -> None:
        """Plan the tiles in the runtime and draw the grid with a time estimate."""
        self._plan(then=None)

    def send(self) -> None:
        """Plan (worker), confirm long runs (main thread), then run (worker)."""
        if self.layer is None or self.runner.busy:
            return
        self._plan(then=self._run_planned)

    def _plan(self, then: Optional[Then]) -> None:
        """The runtime check and the plan run in a task (they may start the runtime child);
        the main thread only gathers what the widgets say."""
        if self.layer is None or self.runner.busy:
            return
        try:
            area = None if self.task_name == "identify" else self.current_area()
            request = self.build_request(area, self._api_key() if then else None,
                                         check=then is not None)
        except GeoChatError as exc:
            self._report_plan_problem(str(exc), then)
            return
        backend = request["model"].get("backend") or self.settings.backend
        model_key, tiled = self.model_key(), request["task"] in TILED
        prompts = len(request.get("prompts") or []) if tiled else 1

        def work(_cancel, _on_token, _on_progress):
            state = runtime_state(backend=backend)
            return client().plan(request) if state.ready else state

        def planned(result) -> None:
            if not hasattr(result, "footprints_wkt"):  # the runtime is not ready
                self.show_runtime(result)
                self._report_plan_problem(result.message, then)
                return
            self.runtime_ready()
            self.preview.show(result.footprints_wkt, result.crs_wkt)
            seconds = estimate_seconds(result.tiles if tiled else 1, prompts,
                                       self._seconds_per_tile(model_key))
            self.preview_label.setText(describe_estimate(result.tiles, seconds) if tiled
                                       else result.message)
            if then is not None:
                count = result.tiles if tiled else 1
                if ((seconds > self.settings.ask_above_seconds or count > ASK_ABOVE_TILES)
                        and not self._confirm_long(seconds, count)):
                    return
                then(request, area)

        task = self.runner.start("GeoChat: planning tiles", work)
        task.resultReady.connect(planned)
        task.failed.connect(lambda message: self._report_plan_problem(message, then))
        task.taskCompleted.connect(self._update_enabled)
        task.taskTerminated.connect(self._update_enabled)
        self._update_enabled()

    def _report_plan_problem(self, message: str, then) -> None:
        self.preview_label.setText(message)
        if then is not None:
            self.chat.add("error", message)

    @staticmethod
    def _seconds_per_tile(model_key: str) -> float:
        """Measured for this model, else a guess: the demo model is tiny, real ones are 7B."""
        demo = model_key in (DEMO_NAME, DEMO_GEOPIXEL_NAME)
        return load_speed(model_key, DEMO_SECONDS_PER_TILE if demo else DEFAULT_SECONDS_PER_TILE)

    def _confirm_long(self, seconds: float, tiles: int) -> bool:
        answer = QMessageBox.question(
            self, "GeoChat", f"This run has {tiles:,} tile(s) and is estimated to take "
                             f"{human_duration(seconds)}. Start it?")
        return answer == QMessageBox.StandardButton.Yes

    def _api_key(self) -> Optional[str]:
        if self.settings.backend != "openai" or not self.settings.auth_config_id:
            return None
        return api_key_from_auth_manager(self.settings.auth_config_id)

    def _output_crs(self) -> str:
        """Results go in the project CRS (the raster's while the project has none)."""
        crs = QgsProject.instance().crs()
        return areas.crs_wkt(crs if crs.isValid() else self.layer.crs())

    # ------------------------------------------------------------------ run
    def _run_planned(self, request: dict[str, Any], area: Optional[areas.Area]) -> None:
        task = request["task"]
        if task in TILED:
            prompts = "; ".join(request.get("prompts") or [])
            name = f"GeoChat {task}: {prompts[:40]}"
            where = area.description if area else "layer"
            self.chat.add("user", f"[{task}] {prompts} over the {where}")
        else:
            name = f"GeoChat {(request.get('question') or task)[:40]}"
            self.chat.add("user", request.get("question") or f"[{task}]")
        path = result_path(results_folder(QgsProject.instance()), name)
        request["output"].update(path=str(path), layer=RESULTS_TABLE)
        if task in TILED:
            run = self.runner.start_request(
                f"GeoChat: {task} over {self.layer.name()}",
                lambda t, cancel: client().run(request, t.on_event, cancel))
            self.progress.setValue(0)
        else:
            run = self.runner.start_request(
                f"GeoChat: {task}", lambda t, cancel: client().ask(request, t.on_event, cancel))
            self.chat.begin_stream()
        self._wire(run, name, task)
        self._update_enabled()

    def _wire(self, run, name: str = "", task: str = "") -> None:
        layer_id = self.layer.id()
        run.tokenReceived.connect(self.chat.append_token)
        run.tileProgress.connect(lambda done, total: self.progress.setValue(int(100 * done / max(1, total))))
        run.tileFailed.connect(self._on_tile_failed)
        run.statusChanged.connect(self.preview_label.setText)
        run.resultReady.connect(lambda result: self._on_result(layer_id, result, name, task))
        run.failed.connect(lambda message: self._on_failed(layer_id, message))
        run.taskCompleted.connect(self._update_enabled)
        run.taskTerminated.connect(self._update_enabled)

    def _on_tile_failed(self, tile: str, message: str) -> None:
        self.preview_label.setText(f"tile {tile} failed: {message}")
        log.warning("GeoChat: tile %s failed: %s", tile, message)

    def _on_failed(self, layer_id: str, message: str) -> None:
        self.chat.end_stream()
        self.chat.add("error", message)
        self.preview_label.setText(f"failed: {message}")
        self.iface.messageBar().pushMessage("GeoChat", message, Qgis.MessageLevel.Warning, 8)
        log.warning("%s", message)
        if "runtime" in message.lower() and "install" in message.lower():
            self.refresh_runtime()
        self._save(layer_id)
        self._update_enabled()

    def _on_result(self, layer_id: str, result: Any, name: str, task: str) -> None:
        """Main thread: open the result file, write the answer, keep the history."""
        self.chat.end_stream()
        try:
            if hasattr(result, "tiles_done"):
                self._show_job(result, name, task)
            else:
                self._show_reply(result, name, task)
        except GeoChatError as exc:
            self.chat.add("error", str(exc))
        self._save(layer_id)
        self._update_enabled()

    def _open_layer(self, output: Optional[str], table: str, name: str, task: str,
                    counts: dict[str, int]) -> Optional[QgsVectorLayer]:
        if not output:
            return None
        layer = add_result_layer(Path(output), name, list(counts), task == "segment",
                                 table=table or RESULTS_TABLE)
        self._watch(layer)
        return layer

    def _show_reply(self, reply: Any, name: str, task: str) -> None:
        layer = self._open_layer(reply.output, reply.layer, name, task, reply.counts)
        self.chat.add("assistant", reply.text or reply.raw, raw=reply.raw,
                      user_text=reply.user_text, layer_id=layer.id() if layer else None,
                      counts=dict(reply.counts))
        self.chat.add("info", f"(looked at {reply.how}; {reply.generated_tokens} tokens in "
                              f"{reply.seconds:.1f} s)")
        self.preview_label.setText(f"answered in {reply.seconds:.1f} s")

    def _show_job(self, result: Any, name: str, task: str) -> None:
        layer = self._open_layer(result.output, result.layer, name, task, result.counts)
        prompts = max(1, len({a.get("prompt") for a in result.answers}))
        if result.tiles_done and result.seconds:
            save_speed(self.model_key(), result.seconds / (result.tiles_done * prompts))
        status = "cancelled, results so far kept" if result.cancelled else (
            f"stopped: {result.error}" if result.error else "done")
        text = (f"Found {result.features} object(s) in {result.tiles_done} of "
                f"{result.tiles_planned} tile(s) in {result.seconds:.1f} s ({status}).")
        if result.failures:
            text += f" {len(result.failures)} tile(s) failed: {result.failures[0].get('message')}"
        if result.note:
            text += f" {result.note}"
        self.chat.add("assistant", text, layer_id=layer.id() if layer else None,
                      counts=dict(result.counts))
        self.progress.setValue(100)
        # the run's last word, not its last status event ("loading <model>..."): the full
        # text is in the chat
        self.preview_label.setText(f"{status}: {result.features} found, {result.tiles_done}/"
                                   f"{result.tiles_planned} tile(s), {result.seconds:.1f} s")
