"""The Processing algorithms against bad input and faults, in real QGIS with the runtime child:
a message that names the input and what to do, results so far kept, an existing output replaced
only by a complete run (issue 15). Hostile servers are local http.servers on 127.0.0.1."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

import processing_helpers as helpers  # noqa: E402
from processing_helpers import (  # noqa: E402, F401 (fixtures: used as arguments)
    detect_run,
    provider,
    runtime,
)


def test_an_aoi_without_polygons_is_refused_by_name(provider, demo_raster, tmp_path):
    import processing

    empty = QgsVectorLayer("Polygon?crs=EPSG:4326", "my fields", "memory")
    parameters = helpers.detect_parameters(demo_raster, "car", str(tmp_path / "out.gpkg"), "")
    parameters["AOI"] = empty
    with pytest.raises(QgsProcessingException, match="The area of interest my fields has no "
                                                     "polygons"):
        processing.run("geochat:detect", parameters)
    assert not list(tmp_path.iterdir())


def test_bad_bands_and_formats_are_refused_before_the_run(provider, demo_raster, tmp_path):
    import processing

    parameters = helpers.detect_parameters(demo_raster, "car", str(tmp_path / "out.gpkg"),
                                   helpers.corner_extent(demo_raster, 100, 100))
    with pytest.raises(QgsProcessingException, match="not a list of band numbers"):
        processing.run("geochat:detect", {**parameters, "BANDS": "red,green"})
    with pytest.raises(QgsProcessingException, match=r"\.shp, \.gpkg or \.geojson"):
        processing.run("geochat:detect", {**parameters, "OUTPUT": str(tmp_path / "out.kml")})
    assert not list(tmp_path.iterdir())


class HostileServer:
    """An OpenAI-compatible server on 127.0.0.1 that answers its first ``good`` chat requests
    with a plain (streamed) answer and every other request with HTTP 500."""

    def __init__(self, good: int = 0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        budget = {"good": good}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self.reply(500, b'{"error": {"message": "the model crashed"}}', "json")

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    ok, budget["good"] = budget["good"] > 0, budget["good"] - 1
                if not ok:
                    return self.do_GET()
                chunks = [{"choices": [{"index": 0, "delta": {"content": "Only fields."},
                                        "finish_reason": None}]},
                          {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
                body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                self.reply(200, body.encode(), "event-stream")

            def reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if kind == "json"
                                 else "text/event-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        import json

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def served_parameters(raster: Path, output: Path, width_px: int, url: str) -> dict:
    return {**helpers.detect_parameters(raster, "car", str(output), helpers.corner_extent(raster, width_px, 200)),
            "BACKEND": "openai", "MODEL": "served", "SERVER_URL": url, "GRAMMAR": False}


def test_every_tile_failing_is_said_and_keeps_the_existing_output(provider, demo_raster,
                                                                  detect_run, tmp_path):
    """A server answering HTTP 500 to everything: each tile's failure is a warning, the run
    fails with the server's message, and the file already there is kept as it was."""
    import processing

    server = HostileServer()
    _, earlier, _ = detect_run
    output = tmp_path / "cars.gpkg"
    output.write_bytes(earlier.read_bytes())
    before = output.read_bytes()
    feedback = helpers.RecordingFeedback()
    try:
        with pytest.raises(QgsProcessingException, match="No tile could be processed"):
            processing.run("geochat:detect", served_parameters(demo_raster, output, 200,
                                                               server.url), feedback=feedback)
    finally:
        server.stop()
    assert any(w.startswith("Tile r0_c0:") and "500" in w for w in feedback.warnings), \
        feedback.warnings
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cars.gpkg"]


def test_some_tiles_failing_are_said_and_the_others_written(provider, demo_raster, tmp_path):
    """Six tiles (3 x 2); the server answers the first four requests only: the failures are
    warnings naming their tiles, the summary says how many, and the output holds the four
    answered. (The openai backend sends tiles in batches of up to four, and a failed request
    fails its whole batch today: so four and two.)"""
    import processing

    server = HostileServer(good=4)
    output = tmp_path / "some.gpkg"
    feedback = helpers.RecordingFeedback()
    parameters = {**served_parameters(demo_raster, output, 1024, server.url),
                  "EXTENT": helpers.corner_extent(demo_raster, 1024, 600)}
    try:
        results = processing.run("geochat:detect", parameters, feedback=feedback)
    finally:
        server.stop()
    assert results["TILES_DONE"] == 4 and results["DETECTIONS"] == 0
    assert sorted(w[:10] for w in feedback.warnings if "HTTP 500" in w) == ["Tile r1_c1",
                                                                             "Tile r1_c2"]
    assert "2 of 6 tiles failed: the output has nothing from their areas." in feedback.warnings
    assert QgsVectorLayer(str(output), "some", "ogr").isValid()


def test_cancel_keeps_an_existing_output_and_writes_the_finished_tile_beside_it(
        provider, demo_raster, detect_run, tmp_path):
    """Three tiles planned; the feedback is cancelled when the first one reports progress:
    the run ends there, its tile is written beside the existing output (only a complete run
    replaces it), and the result names that file."""
    import processing

    _, earlier, _ = detect_run
    output = tmp_path / "cars.gpkg"
    output.write_bytes(earlier.read_bytes())
    before = output.read_bytes()
    feedback = QgsProcessingFeedback()
    progress: list[float] = []

    def on_progress(value: float) -> None:
        progress.append(value)
        feedback.cancel()

    feedback.progressChanged.connect(on_progress)
    results = processing.run("geochat:detect", helpers.detect_parameters(
        demo_raster, "car", str(output), helpers.corner_extent(demo_raster, 1024, 300)),
        feedback=feedback)
    assert progress and progress[0] == pytest.approx(100 / 3)
    assert max(progress) < 100
    assert results["TILES_DONE"] == 1
    assert output.read_bytes() == before
    partial = Path(results["OUTPUT"])
    assert partial.parent == tmp_path and partial.name.startswith("cars-partial-")
    assert {tile for _, tile, _ in helpers.features_of(partial)} <= {"r0_c0"}
    assert len(helpers.features_of(partial)) == results["DETECTIONS"]


def kill_the_runtime_at_first_progress(feedback: QgsProcessingFeedback) -> list[int]:
    """SIGKILL the runtime child (as the out-of-memory killer does) when ``feedback`` first
    reports progress; the pids killed."""
    import signal

    killed: list[int] = []

    def kill_once(value: float) -> None:  # a Qt slot: raising here would abort the process
        pid = helpers.shared_client().pid
        if not killed and pid:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    feedback.progressChanged.connect(kill_once)
    return killed


def test_a_run_stopped_early_loads_the_file_it_wrote(provider, demo_raster, detect_run,
                                                     tmp_path):
    """As the dialog loads outputs: a run stopped by an error (here the runtime killed after
    the first tile) over an existing file loads the partial file it wrote beside it, not the
    old one. (A cancelled run loads nothing: QGIS skips loading after a cancel.)"""
    import processing

    _, earlier, _ = detect_run
    output = tmp_path / "cars.gpkg"
    output.write_bytes(earlier.read_bytes())
    before = output.read_bytes()
    feedback = QgsProcessingFeedback()
    kill_the_runtime_at_first_progress(feedback)
    results = processing.runAndLoadResults("geochat:detect", helpers.detect_parameters(
        demo_raster, "car", str(output), helpers.corner_extent(demo_raster, 1024, 300)),
        feedback=feedback)
    try:
        sources = [layer.source() for layer in QgsProject.instance().mapLayers().values()]
        partial = Path(results["OUTPUT"])
        assert partial.name.startswith("cars-partial-") and partial.exists()
        assert len(sources) == 1 and sources[0].startswith(str(partial))
        assert output.read_bytes() == before
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_a_run_that_processes_nothing_keeps_the_existing_output(provider, data_dir,
                                                               detect_run, tmp_path):
    """Every tile of all-nodata.tif is nodata: nothing replaces the file already there."""
    import processing

    _, earlier, _ = detect_run
    output = tmp_path / "cars.gpkg"
    output.write_bytes(earlier.read_bytes())
    before = output.read_bytes()
    with pytest.raises(QgsProcessingException, match="nodata.*kept"):
        processing.run("geochat:detect", helpers.detect_parameters(
            data_dir / "all-nodata.tif", "car", str(output), ""))
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cars.gpkg"]


def test_a_raster_without_a_crs_is_refused_with_what_to_do(provider, data_dir, tmp_path):
    import processing

    raster = data_dir / "float_nan.tif"
    assert not QgsRasterLayer(str(raster), "r").crs().isValid()
    with pytest.raises(QgsProcessingException, match="has no coordinate reference system: "
                                                     "set it"):
        processing.run("geochat:detect", helpers.detect_parameters(raster, "car",
                                                           str(tmp_path / "out.gpkg"), ""))
    assert not list(tmp_path.iterdir())


def test_a_runtime_killed_mid_run_keeps_the_finished_tile(provider, demo_raster, tmp_path):
    """The runtime child is SIGKILLed (as the out-of-memory killer does) after the first of
    three tiles: a fresh child writes that tile, the run reports the death as an error, and
    the next run works in yet another child."""
    import processing

    feedback = helpers.RecordingFeedback()
    killed = kill_the_runtime_at_first_progress(feedback)
    output = tmp_path / "killed.gpkg"
    results = processing.run("geochat:detect", helpers.detect_parameters(
        demo_raster, "car", str(output), helpers.corner_extent(demo_raster, 1024, 300)),
        feedback=feedback)
    assert killed and results["TILES_DONE"] >= 1
    assert results["OUTPUT"] == str(output)
    found = helpers.features_of(output)
    assert len(found) == results["DETECTIONS"]
    assert {tile for _, tile, _ in found} <= {"r0_c0", "r0_c1"}
    assert any("SIGKILL" in w for w in feedback.warnings), feedback.warnings
    again = processing.run("geochat:detect", helpers.detect_parameters(
        demo_raster, "car", "TEMPORARY_OUTPUT", helpers.corner_extent(demo_raster, 200, 200)))
    assert again["TILES_DONE"] == 1 and helpers.shared_client().pid not in (None, killed[0])


def test_cancel_from_the_gui_thread_stops_the_worker_within_a_tile(provider, demo_raster,
                                                                   tmp_path):
    """The dialog's Cancel: feedback.cancel() on the main thread while the algorithm runs on
    the task manager's thread. The first tile's progress cancels; the runtime stops the second
    tile between tokens, the third never starts; the finished tile's detections are written."""
    feedback = QgsProcessingFeedback()
    seen: list[float] = []

    def on_progress(value: float) -> None:  # queued to this (the main) thread
        seen.append(value)
        feedback.cancel()

    feedback.progressChanged.connect(on_progress)
    output = tmp_path / "cancelled.gpkg"
    ok, results = helpers.run_task("geochat:detect", helpers.detect_parameters(
        demo_raster, "car", str(output), helpers.corner_extent(demo_raster, 1024, 300)), feedback)
    assert seen and seen[0] == pytest.approx(100 / 3) and max(seen) < 100
    assert feedback.isCanceled()
    assert results["TILES_DONE"] == 1
    assert results["OUTPUT"] == str(output)  # no file was there: the finished tile goes in
    assert len(helpers.features_of(output)) == results["DETECTIONS"]
    assert {tile for _, tile, _ in helpers.features_of(output)} <= {"r0_c0"}


def test_model_errors_are_processing_exceptions(provider, demo_raster, tmp_path):
    import processing

    with pytest.raises(QgsProcessingException, match="no-such-model"):
        processing.run("geochat:detect", {"INPUT": str(demo_raster), "PROMPT": "car",
                                          "MODEL": "no-such-model",
                                          "OUTPUT": str(tmp_path / "out.gpkg")})
    assert not list(tmp_path.iterdir())


def test_without_a_runtime_the_message_names_the_install_menu_entry(provider, demo_raster,
                                                                    tmp_path, monkeypatch):
    """A runtime interpreter without GeoChat's core (an isolated system Python): the run is
    refused before anything starts, naming the plugin's install entry."""
    import processing

    helpers.close_shared_client()
    monkeypatch.setenv("GEOCHAT_RUNTIME_PYTHON", "/usr/bin/python3 -I")
    try:
        with pytest.raises(QgsProcessingException) as raised:
            processing.run("geochat:detect", helpers.detect_parameters(
                demo_raster, "car", str(tmp_path / "out.gpkg"),
                helpers.corner_extent(demo_raster, 100, 100)))
        message = str(raised.value)
        assert "Raster > GeoChat > Install model dependencies..." in message
        assert "geochat_qgis" in message  # what that interpreter lacks
        assert helpers.shared_client().pid is None  # no child was started
    finally:
        helpers.close_shared_client()
    assert not list(tmp_path.iterdir())


def test_this_session_imported_no_core_package_in_its_runs():
    """Last: every algorithm this module ran added none of the core's packages here."""
    assert not helpers.forbidden_modules()
