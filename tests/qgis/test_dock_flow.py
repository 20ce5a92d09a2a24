"""The analyst's flow in the dock, in real QGIS offscreen: the tiny demo model through
llama.cpp in the runtime child (GEOCHAT_RUNTIME_PYTHON), QGIS's process holding only QGIS."""
from __future__ import annotations

import sys
import time

import pytest
from qgis.core import (
    QgsCoordinateTransform,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QUrl

from geochat_qgis.gui import area as areas
from geochat_qgis.gui.chat_view import HIGHLIGHT, phrase_href
from geochat_qgis.gui.dock import GeoChatDock
from geochat_qgis.gui.result_layers import GROUP_NAME
from qgis_runtime import FORBIDDEN, open_dock, run_until_done, runtime_python

# the core's export schema (core/export.py FIELDS; QGIS's side does not import the core)
SCHEMA = {"label", "phrase", "task", "prompt", "model", "angle", "score", "kind", "flags",
          "tile_id", "raster", "run_id", "created"}
_BEFORE = {name for name in FORBIDDEN if name in sys.modules}  # imported by others' modules


def forbidden_modules() -> list[str]:
    return [name for name in FORBIDDEN if name in sys.modules and name not in _BEFORE]


@pytest.fixture()
def dock(qgis_iface, qgis_new_project, demo_raster, runtime_cache):
    widget = open_dock(qgis_iface, demo_raster, runtime_cache[0], "tiny-demo", 24)
    yield widget
    widget.cleanup()
    widget.deleteLater()
    QgsProject.instance().removeAllMapLayers()
    assert not forbidden_modules(), "core packages were imported into QGIS's process"


def choose(dock: GeoChatDock, task: str, prompt: str, area: str = areas.LAYER) -> None:
    """Set the task, area and prompt as the analyst does in the dock."""
    dock.task_combo.setCurrentIndex(dock.task_combo.findData(task))
    dock.area_combo.setCurrentIndex(dock.area_combo.findData(area))
    dock.prompt_edit.setText(prompt)


def test_find_objects_adds_a_layer_in_project_crs(dock):
    choose(dock, "refer", "car")
    dock.show_preview()  # planned by the runtime child: footprints come back as WKT
    run_until_done(dock)
    assert dock.preview_label.text().startswith("9 tile(s)"), dock.preview_label.text()
    assert dock.preview.band is not None and dock.preview.band.size() == 9
    dock.send()
    assert dock.runner.busy and dock.cancel_button.isEnabled()
    stall = run_until_done(dock)
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP_NAME)
    assert group is not None and len(group.findLayers()) == 1, dock.chat.messages
    layer = group.findLayers()[0].layer()
    assert layer.crs().authid() == "EPSG:4326"
    assert layer.source().split("|")[0].endswith(".gpkg")  # the runtime's GeoPackage
    assert SCHEMA <= set(layer.fields().names())
    assert layer.featureCount() >= 1  # the grammar makes even random weights answer with boxes
    feature = next(layer.getFeatures())
    assert feature["task"] == "refer" and feature["prompt"] == "car" and feature["label"] == "car"
    # the boxes lie on the raster, reprojected from EPSG:3857 to degrees
    to_4326 = QgsCoordinateTransform(dock.layer.crs(), layer.crs(), QgsProject.instance())
    raster_4326 = to_4326.transformBoundingBox(dock.layer.extent())
    raster_4326.grow(1e-9)
    assert raster_4326.contains(layer.extent()), (raster_4326.toString(), layer.extent().toString())
    last = dock.chat.messages[-1]
    assert last["role"] == "assistant" and last["layer_id"] == layer.id()
    assert last["counts"]["car"] == layer.featureCount()
    # the interface stayed responsive: the run (seconds) never blocked the main thread; the
    # longest stall is opening and styling the result (about 40 ms; 250 leaves room for a
    # loaded 2-core machine)
    assert stall < 250, f"main thread blocked for {stall} ms"


def test_chat_streams_tokens_and_keeps_history_with_the_project(dock):
    choose(dock, "chat", "What is in this image?")
    streamed = []
    stream_to_view = dock.chat.append_token
    dock.chat.append_token = lambda piece: (streamed.append(piece), stream_to_view(piece))
    dock.send()  # plans in a task, then asks in another
    run_until_done(dock)
    roles = [m["role"] for m in dock.chat.messages]
    assert roles[:2] == ["user", "assistant"]
    assert streamed, "no token was streamed"
    answer = dock.chat.messages[1]
    assert answer["user_text"] == "What is in this image?" and "raw" in answer
    from geochat_qgis.gui.chat_history import load_history

    assert load_history(QgsProject.instance(), dock.layer.id()) == dock.chat.messages


def test_export_detections_and_export_all(dock, tmp_path):
    choose(dock, "refer", "car; tree")
    dock.send()
    run_until_done(dock)
    layer = dock.results_bar.current_result_layer()
    assert layer is not None, dock.chat.messages
    shp = dock.results_bar.export_current(path=tmp_path / "cars.shp")
    assert shp == tmp_path / "cars.shp"
    for suffix in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
        assert (tmp_path / f"cars{suffix}").is_file()
    reopened = QgsVectorLayer(str(shp), "reopened", "ogr")
    assert reopened.isValid() and reopened.featureCount() == layer.featureCount()
    assert reopened.crs().authid() == "EPSG:4326"
    original = sorted((f["label"], round(f.geometry().area(), 12)) for f in layer.getFeatures())
    again = sorted((f["label"], round(f.geometry().area(), 12)) for f in reopened.getFeatures())
    assert original == again
    gpkg = dock.results_bar.export_everything(path=tmp_path / "all.gpkg")
    assert gpkg is not None and "Exported 1 result layer(s)" in dock.chat.messages[-1]["text"]


def test_settings_dialog_round_trip(dock):
    from geochat_qgis.gui.settings_dialog import SettingsDialog

    dialog = SettingsDialog(dock.settings, dock)
    dialog.tile_size.setValue(448)
    dialog.angle.setCurrentText("ccw")
    settings = dialog.apply()
    assert settings.tile_size == 448 and settings.angle_convention == "ccw"
    from geochat_qgis.toolbelt.settings import PluginSettings

    assert PluginSettings.load().tile_size == 448


def test_cancel_mid_run_ends_within_a_tile_and_keeps_finished_tiles(dock):
    dock.settings.overlap = 0.5  # 16 tiles over the 1024 px demo raster
    choose(dock, "refer", "house")
    marks: dict[str, float] = {}

    def on_progress(done: int, total: int) -> None:
        marks.setdefault("first_tile", time.monotonic() - marks["start"])
        if done >= 2 and "cancel" not in marks:
            marks["cancel"] = time.monotonic()
            dock.runner.cancel()

    original_wire = dock._wire

    def wire(run, *args):
        original_wire(run, *args)
        marks["start"] = time.monotonic()
        run.tileProgress.connect(on_progress)
        run.resultReady.connect(lambda _result: marks.setdefault("end", time.monotonic()))

    dock._wire = wire
    dock.send()
    run_until_done(dock)
    answer = dock.chat.messages[-1]
    assert "cancelled, results so far kept" in answer["text"], dock.chat.messages
    layer = QgsProject.instance().mapLayer(answer["layer_id"])
    tiles = {f["tile_id"] for f in layer.getFeatures()}
    assert 2 <= len(tiles) < 16  # finished tiles' features are kept, the rest never ran
    # it stopped within about one tile's time of the cancel
    per_tile = marks["first_tile"]
    assert marks["end"] - marks["cancel"] < max(2 * per_tile, 1.0), marks


def test_phrase_click_selects_features_and_selection_highlights_the_phrase(dock):
    choose(dock, "refer", "car; tree")
    dock.send()
    run_until_done(dock)
    answer = dock.chat.messages[-1]
    layer = QgsProject.instance().mapLayer(answer["layer_id"])
    html = dock.chat.toHtml()
    assert "geochat:" in html  # the labels are links
    dock.chat.anchorClicked.emit(QUrl(phrase_href(layer.id(), "tree")))
    selected = {f["label"] for f in layer.getSelectedFeatures()}
    assert selected == {"tree"}
    assert layer.selectedFeatureCount() == answer["counts"]["tree"]
    # selecting features on the map marks their phrase in the chat
    layer.selectByIds([f.id() for f in layer.getFeatures() if f["label"] == "car"])
    assert dock.chat.highlighted[layer.id()] == {"car"}
    assert HIGHLIGHT in dock.chat.toHtml().lower()


def test_identify_a_drawn_region(dock, qgis_iface):
    from qgis.PyQt.QtCore import QEvent, QPoint, Qt
    from qgis.gui import QgsMapMouseEvent

    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(dock.layer.crs())
    canvas.setExtent(dock.layer.extent())
    canvas.refresh()
    canvas.setMapTool(dock.region_tool)
    extent = dock.layer.extent()
    to_pixels = canvas.getCoordinateTransform()
    for fx, fy, button in ((0.3, 0.3, Qt.MouseButton.LeftButton), (0.45, 0.3, Qt.MouseButton.LeftButton),
                           (0.45, 0.5, Qt.MouseButton.LeftButton), (0.5, 0.5, Qt.MouseButton.RightButton)):
        x = extent.xMinimum() + fx * extent.width()
        y = extent.yMaximum() - fy * extent.height()
        pixel = to_pixels.transform(x, y)
        point = QPoint(round(pixel.x()), round(pixel.y()))
        event = QgsMapMouseEvent(canvas, QEvent.Type.MouseButtonRelease, point, button)
        dock.region_tool.canvasReleaseEvent(event)
    assert dock.region is not None and dock.region.area() > 0
    assert dock.task_name == "identify"
    dock.prompt_edit.setText("")
    dock.send()
    run_until_done(dock)
    answers = [m for m in dock.chat.messages if m["role"] == "assistant"]
    assert answers, dock.chat.messages
    answer = answers[-1]
    assert answer["user_text"].startswith("[identify] What is the object present at {<")


def test_server_status_says_unreachable_then_ready(dock, runtime_cache):
    """The openai backend's status line asks the server: a closed port, then a real
    `python -m llama_cpp.server` on 127.0.0.1 serving the tiny GGUF."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dock.settings.backend = "openai"
    dock.settings.server_url = f"http://127.0.0.1:{port}/v1"
    dock.settings.server_model = "tiny"
    dock.refresh_model_status()
    run_until_done(dock)
    assert "server unreachable" in dock.status_label.text(), dock.status_label.text()
    demo = runtime_cache[1]
    server = subprocess.Popen(
        [*runtime_python(), "-m", "llama_cpp.server", "--model", str(demo / "model.gguf"),
         "--clip_model_path", str(demo / "mmproj.gguf"), "--chat_format", "llava-1-5",
         "--model_alias", "tiny", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dock.refresh_model_status()
            run_until_done(dock)
            if "ready" in dock.status_label.text():
                break
            time.sleep(0.5)
        assert "serves 'tiny'" in dock.status_label.text(), dock.status_label.text()
    finally:
        server.terminate()
        server.wait(10)


def test_first_use_says_the_runtime_is_missing_and_offers_the_installer(
        qgis_iface, qgis_new_project, demo_raster, tmp_path, monkeypatch):
    """No runtime (no GEOCHAT_RUNTIME_PYTHON, an empty managed-environment folder): the dock
    says so at once, Send names what to do and starts no child, and the one button opens the
    installer for the core packages plus the chosen backend, into the managed environment."""
    from geochat_qgis.client import close_shared_client, shared_client
    from geochat_qgis.gui.deps_dialog import DepsDialog

    close_shared_client()
    monkeypatch.delenv("GEOCHAT_RUNTIME_PYTHON", raising=False)
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "deps"))
    raster = QgsRasterLayer(str(demo_raster), "cogeo")
    QgsProject.instance().addMapLayer(raster)
    qgis_iface.setActiveLayer(raster)
    widget = GeoChatDock(qgis_iface)
    try:
        widget.settings.backend = "llama.cpp"
        widget.refresh_runtime()
        assert not widget.runtime_label.isHidden() and not widget.runtime_button.isHidden()
        text = widget.runtime_label.text()
        assert "runtime is not installed" in text and "llama.cpp" in text, text
        choose(widget, "refer", "car")
        widget.send()
        run_until_done(widget)
        error = widget.chat.messages[-1]
        assert error["role"] == "error" and "not installed" in error["text"], widget.chat.messages
        assert "Install" in error["text"]
        assert shared_client().pid is None  # no child was started
        widget.runtime_button.click()
        dialog = widget._deps_dialog
        assert isinstance(dialog, DepsDialog) and dialog.isVisible()
        packages = dialog.packages_label.text()
        for package in ("rasterio", "shapely", "pyproj", "numpy", "llama-cpp-python"):
            assert package in packages, packages
        assert str(tmp_path / "deps") in str(dialog.env.path)
        dialog.close()
        assert not widget.runtime_button.isHidden()  # nothing was installed
    finally:
        widget.cleanup()
        widget.deleteLater()
        QgsProject.instance().removeAllMapLayers()
        close_shared_client()


def test_runtime_events_reach_the_widgets(dock):
    """The runtime's events (progress, streamed tokens, a tile that failed, a wait) as the
    dock shows them; the task's signals are delivered on the main thread."""
    from geochat_qgis.gui.run_task import GeoChatTask

    task = GeoChatTask("events", lambda *_args: None)
    dock._wire(task, "GeoChat refer: car", "refer")
    dock.chat.begin_stream()
    task.on_event({"type": "progress", "done": 3, "total": 4, "detections": 1})
    task.on_event({"type": "token", "text": "a box", "tile": 0})
    assert dock.progress.value() == 75 and "a box" in dock.chat.toPlainText()
    task.on_event({"type": "tile_failed", "tile": "r0c1", "message": "no answer", "prompt": "car"})
    assert dock.preview_label.text() == "tile r0c1 failed: no answer"
    task.on_event({"type": "status", "message": "Waiting for the GeoChat run in progress"})
    assert dock.preview_label.text().startswith("Waiting")
    dock.chat.end_stream()
