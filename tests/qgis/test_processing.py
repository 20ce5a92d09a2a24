"""The GeoChat Processing algorithms in real QGIS (offscreen), the model in the runtime child.

QGIS's process holds only QGIS: these tests run under .venv-qgis (no core package importable)
with ``GEOCHAT_RUNTIME_PYTHON`` naming the runtime's interpreter (.venv). The model is the tiny
random-weight demo ("tiny-demo", built by the child on first use); GRAMMAR=true makes its
answers boxes, so detections exist and the whole chain (request -> runtime -> tiles ->
llama.cpp -> parse -> georeference -> merge -> GeoPackage) runs. Extents are kept to one or a
few 504 px tiles (about a second of model time each).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingModelAlgorithm,
    QgsProcessingModelChildAlgorithm,
    QgsProcessingModelChildParameterSource,
    QgsProcessingModelOutput,
    QgsProcessingModelParameter,
    QgsProcessingParameterExtent,
    QgsProcessingParameterRasterLayer,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant  # noqa: E402

from processing_helpers import (  # noqa: E402
    MODEL,
    ROOT,
    FORBIDDEN,
    RecordingFeedback,
    corner,
    corner_extent,
    detect_parameters,
    features_of,
    forbidden_modules,
    run_task,
    shared_client,
)
from processing_helpers import (  # noqa: E402, F401 (fixtures: used as arguments)
    detect_run,
    provider,
    runtime,
)
# the core's export schema, in order (core/export.py FIELDS; more provenance may follow)
SCHEMA = ["label", "phrase", "task", "prompt", "model", "angle", "score", "kind", "flags",
          "tile_id", "raster", "run_id", "created"]


def cli_detect(raster: Path, prompts: list[str], extent: tuple[float, ...], output: Path,
               cache: str) -> None:
    """The same choices through the command line, in the runtime's interpreter."""
    python = shlex.split(os.environ["GEOCHAT_RUNTIME_PYTHON"])
    prompt_args = [arg for prompt in prompts for arg in ("--prompt", prompt)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GEOCHAT_CACHE": cache}
    done = subprocess.run(
        [*python, "-m", "geochat_qgis", "detect", str(raster), "--model", MODEL, *prompt_args,
         "--grammar", "--max-new-tokens", "24", "--extent=" + ",".join(map(str, extent)),
         "-o", str(output), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_provider_lists_the_four_algorithms(provider):
    ids = sorted(algorithm.id() for algorithm in provider.algorithms())
    assert ids == ["geochat:describe", "geochat:detect", "geochat:export", "geochat:segment"]
    detect = QgsApplication.processingRegistry().algorithmById("geochat:detect")
    names = [parameter.name() for parameter in detect.parameterDefinitions()]
    for name in ("INPUT", "EXTENT", "AOI", "PROMPT", "TASK", "MODEL", "BACKEND", "MMPROJ",
                 "SERVER_URL", "TILE_SIZE", "OVERLAP", "GSD", "OUTPUT"):
        assert name in names
    assert detect.parameterDefinition("TASK").defaultValue() == "refer"
    assert detect.parameterDefinition("BACKEND").options() == ["auto", "llama.cpp",
                                                               "transformers", "openai"]
    assert provider.supportedOutputVectorLayerExtensions() == ["gpkg", "shp", "geojson"]


def test_detect_writes_what_the_command_line_finds(detect_run, demo_raster, runtime, tmp_path):
    """The runtime writes the GeoPackage in the raster's CRS with the core's schema, and it
    holds exactly what ``python -m geochat_qgis detect`` finds for the same choices."""
    results, output, parameters = detect_run
    layer = QgsVectorLayer(str(output), "cars", "ogr")
    assert layer.isValid()
    assert layer.crs().authid() == "EPSG:3857"  # the raster's CRS
    names = [name for name in layer.fields().names() if name != "fid"]
    assert names[:len(SCHEMA)] == SCHEMA
    assert results["OUTPUT"] == str(output)
    assert results["TILES_DONE"] == 1
    assert results["DETECTIONS"] == layer.featureCount() > 0

    expected = tmp_path / "cli.gpkg"
    cli_detect(demo_raster, ["car", "road"], corner(demo_raster, 300, 300), expected, runtime)
    assert features_of(output) == features_of(expected)
    assert {label for label, _, _ in features_of(output)} <= {"car", "road"}
    first = next(layer.getFeatures())
    assert first["task"] == "refer" and first["raster"] == str(demo_raster)
    assert first["model"].startswith("llama.cpp") and first["created"]
    assert not forbidden_modules()


def test_a_loaded_output_is_styled_like_the_dock_results(provider, demo_raster):
    """As the Processing dialog loads outputs: one colour per label, map tips, from the QML."""
    import processing

    results = processing.runAndLoadResults("geochat:detect", detect_parameters(
        demo_raster, "car\nroad", "TEMPORARY_OUTPUT", corner_extent(demo_raster, 300, 300)))
    layers = list(QgsProject.instance().mapLayers().values())
    try:
        assert len(layers) == 1
        layer = layers[0]
        assert layer.source().startswith(results["OUTPUT"])
        assert layer.featureCount() == results["DETECTIONS"] > 0
        renderer = layer.renderer()
        assert renderer.type() == "categorizedSymbol" and renderer.classAttribute() == "label"
        assert {c.value() for c in renderer.categories()} == {
            f["label"] for f in layer.getFeatures()}
        assert '"phrase"' in layer.mapTipTemplate()
    finally:
        QgsProject.instance().removeAllMapLayers()
    assert not forbidden_modules()


def aoi_layer(raster: Path, offsets: list[tuple[int, int]]) -> QgsVectorLayer:
    """Squares of 60 px, ``offsets`` (in 60 px steps from the top-left and bottom-right
    corners), drawn in EPSG:4326."""
    layer = QgsRasterLayer(str(raster), "r")
    to_wgs84 = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:4326"),
                                      QgsProject.instance())
    extent, step = layer.extent(), 60 * layer.rasterUnitsPerPixelX()
    aoi = QgsVectorLayer("Polygon?crs=EPSG:4326", "aoi squares", "memory")
    squares = []
    for x, y in ((extent.xMinimum() + step, extent.yMaximum() - 2 * step),
                 (extent.xMaximum() - 2 * step, extent.yMinimum() + step))[:len(offsets)]:
        square = QgsGeometry.fromRect(QgsRectangle(x, y, x + step, y + step))
        square.transform(to_wgs84)
        feature = QgsFeature()
        feature.setGeometry(square)
        squares.append(feature)
    assert aoi.dataProvider().addFeatures(squares)[0]
    return aoi


def test_detect_runs_only_the_tiles_touching_the_aoi(provider, demo_raster):
    """Two small squares (drawn in EPSG:4326) near opposite corners of the 1024 px raster: the
    AOI goes to the runtime as WKT with its CRS; only the two corner tiles touching it run."""
    import processing

    parameters = detect_parameters(demo_raster, "car", "TEMPORARY_OUTPUT", "")
    parameters["AOI"] = aoi_layer(demo_raster, [(1, 2), (2, 1)])
    del parameters["EXTENT"]
    results = processing.run("geochat:detect", parameters)
    assert results["TILES_DONE"] == 2
    assert {tile for _, tile, _ in features_of(results["OUTPUT"])} <= {"r0_c0", "r1_c1"}


def models_answered(url: str, api_key: str) -> dict | None:
    """The server's GET /models answer, or None while it is not up yet."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return json.load(response)
    except OSError:
        return None


class RuntimeLlamaServer:
    """``llama_cpp.server`` run by the runtime's interpreter (this process has no llama_cpp)
    for a GGUF folder, on a free port of 127.0.0.1."""

    def __init__(self, folder: Path, log: Path, api_key: str) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        python = shlex.split(os.environ["GEOCHAT_RUNTIME_PYTHON"])
        options = {"--model": folder / "model.gguf", "--clip_model_path": folder / "mmproj.gguf",
                   "--chat_format": "mtmd", "--n_ctx": 2048, "--host": "127.0.0.1",
                   "--port": port, "--api_key": api_key}
        self.log = open(log, "wb")
        self.process = subprocess.Popen(
            [*python, "-m", "llama_cpp.server", *(str(v) for kv in options.items() for v in kv)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        self.models = models_answered(self.url, api_key)
        while self.models is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.skip(f"llama_cpp.server did not start in the runtime: see {log}")
            time.sleep(0.3)
            self.models = models_answered(self.url, api_key)

    def stop(self) -> None:
        """Kill it (nothing to save) and close its log."""
        if self.process.returncode is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()


@pytest.mark.slow
def test_detect_through_an_openai_compatible_server(detect_run, runtime, tmp_path,
                                                   monkeypatch):
    """BACKEND=openai + SERVER_URL (+ the API key from $GEOCHAT_API_KEY) against a real
    llama_cpp.server running the same demo GGUF: the same features as the local run."""
    import processing

    demo = Path(runtime) / MODEL
    assert (demo / "model.gguf").is_file()  # built by the earlier run
    server = RuntimeLlamaServer(demo, tmp_path / "server.log", api_key="key-7")
    monkeypatch.setenv("GEOCHAT_API_KEY", "key-7")
    try:
        _, local, parameters = detect_run
        output = tmp_path / "over-http.gpkg"
        results = processing.run("geochat:detect", {
            **parameters, "BACKEND": "openai", "SERVER_URL": server.url,
            "MODEL": server.models["data"][0]["id"], "OUTPUT": str(output)})
    finally:
        server.stop()
    assert results["TILES_DONE"] == 1
    assert features_of(output) == features_of(local)
    assert next(QgsVectorLayer(str(output), "http", "ogr").getFeatures())["model"].startswith(
        "openai")


def test_batch_over_two_rasters_and_two_prompts(provider, data_dir, tmp_path):
    """Batch rows run one after another, as the batch dialog runs them, in one runtime child
    that keeps its model loaded; the last row goes through QgsProcessingAlgRunnerTask on the
    task manager (a worker thread, as in QGIS)."""
    import processing

    rows = [(data_dir / raster, prompt)
            for raster in ("cogeo.tif", "rgb1_fake_nir_epsg3857.tif")
            for prompt in ("car", "building")]
    outputs = []
    children = []
    for index, (raster, prompt) in enumerate(rows[:-1]):
        output = tmp_path / f"row{index}.gpkg"
        results = processing.run("geochat:detect", detect_parameters(
            raster, prompt, str(output), corner_extent(raster, 200, 200)))
        outputs.append((results, output, prompt))
        children.append((shared_client().pid, shared_client().status()["loaded"]))
    # the batch loads its model once: every row ran in the same child on the same model
    assert children[0][0] is not None and children[0][1]
    assert all(child == children[0] for child in children)

    raster, prompt = rows[-1]
    output = tmp_path / "row3.gpkg"
    ok, results = run_task("geochat:detect", detect_parameters(
        raster, prompt, str(output), corner_extent(raster, 200, 200)), QgsProcessingFeedback())
    assert ok
    outputs.append((results, output, prompt))

    for results, output, prompt in outputs:
        layer = QgsVectorLayer(str(output), "row", "ogr")
        assert layer.isValid() and layer.crs().authid() == "EPSG:3857"
        assert results["TILES_DONE"] == 1
        assert layer.featureCount() == results["DETECTIONS"]
        assert {f["prompt"] for f in layer.getFeatures()} <= {prompt}
    assert sum(results["DETECTIONS"] for results, _, _ in outputs) > 0
    rasters = {f["raster"] for _, output, _ in outputs
               for f in QgsVectorLayer(str(output), "row", "ogr").getFeatures()}
    assert rasters <= {str(data_dir / "cogeo.tif"),
                       str(data_dir / "rgb1_fake_nir_epsg3857.tif")}


def test_a_run_waits_for_the_docks_run_and_cancelling_the_wait_touches_neither(
        provider, demo_raster, tmp_path):
    """The dock and Processing share one runtime: while the dock's run goes on, an algorithm
    waits its turn; cancelling it while it waits ends it at once with nothing run, and the
    dock's run finishes all its tiles."""
    import threading

    import processing

    started = threading.Event()
    dock: dict = {}

    def dock_run() -> None:
        request = {"raster": str(demo_raster), "task": "refer", "prompts": ["car"],
                   "model": {"name": MODEL}, "options": {"max_new_tokens": 24},
                   "output": {"path": str(tmp_path / "dock.gpkg")}}  # 9 tiles: seconds
        dock["result"] = shared_client().run(request, on_event=lambda event: started.set())

    thread = threading.Thread(target=dock_run)
    thread.start()
    assert started.wait(120), "the dock's run did not start"
    feedback = RecordingFeedback()
    threading.Timer(0.3, feedback.cancel).start()
    began = time.monotonic()
    with pytest.raises(QgsProcessingException, match="Cancelled while waiting"):
        processing.run("geochat:detect", detect_parameters(
            demo_raster, "car", str(tmp_path / "processing.gpkg"),
            corner_extent(demo_raster, 200, 200)), feedback=feedback)
    assert time.monotonic() - began < 5
    thread.join(180)
    assert dock["result"].tiles_done == 9 and not dock["result"].cancelled
    assert not (tmp_path / "processing.gpkg").exists()


def test_detect_in_a_model_with_export(provider, demo_raster, tmp_path):
    """The model builder's API: raster + extent -> geochat:detect -> geochat:export."""
    import processing

    model = QgsProcessingModelAlgorithm("detect and export", "GeoChat tests")
    for parameter in (QgsProcessingParameterRasterLayer("raster", "Raster"),
                      QgsProcessingParameterExtent("extent", "Extent")):
        model.addModelParameter(parameter, QgsProcessingModelParameter(parameter.name()))
    detect = QgsProcessingModelChildAlgorithm("geochat:detect")
    detect.setChildId("detect")
    detect.addParameterSources("INPUT", [
        QgsProcessingModelChildParameterSource.fromModelParameter("raster")])
    detect.addParameterSources("EXTENT", [
        QgsProcessingModelChildParameterSource.fromModelParameter("extent")])
    for name, value in (("PROMPT", "car"), ("TASK", "refer"), ("MODEL", MODEL),
                        ("BACKEND", "llama.cpp"), ("GRAMMAR", True), ("MAX_NEW_TOKENS", 24)):
        detect.addParameterSources(name, [
            QgsProcessingModelChildParameterSource.fromStaticValue(value)])
    model.addChildAlgorithm(detect)
    export = QgsProcessingModelChildAlgorithm("geochat:export")
    export.setChildId("export")
    export.addParameterSources("INPUT", [
        QgsProcessingModelChildParameterSource.fromChildOutput("detect", "OUTPUT")])
    exported = QgsProcessingModelOutput("exported", "Exported detections")
    exported.setChildOutputName("OUTPUT")
    exported.setChildId("export")
    export.setModelOutputs({"exported": exported})
    model.addChildAlgorithm(export)
    model.updateDestinationParameters()
    assert model.dependentChildAlgorithms("detect") == {"export"}

    output = tmp_path / "model.geojson"
    # the model's destination parameter: "export:exported" on QGIS 3.22, named after the
    # output's description on 3.40 ("exported_detections")
    (destination,) = [d.name() for d in model.destinationParameterDefinitions()]
    results = processing.run(model, {"raster": str(demo_raster),
                                     "extent": corner_extent(demo_raster, 300, 300),
                                     destination: str(output)})
    layer = QgsVectorLayer(str(output), "exported", "ogr")
    assert results[destination] == str(output)
    assert layer.isValid() and layer.featureCount() > 0
    assert {f["label"] for f in layer.getFeatures()} == {"car"}


def test_export_round_trip(detect_run, provider, tmp_path):
    """A detect result layer -> Shapefile and GeoJSON -> the same features come back."""
    import processing

    _, source, _ = detect_run
    original = QgsVectorLayer(str(source), "cars", "ogr")
    for name, crs in (("cars.shp", None), ("cars.geojson", "EPSG:4326")):
        output = tmp_path / name
        parameters = {"INPUT": str(source), "OUTPUT": str(output)}
        if crs:
            parameters["CRS"] = crs
        results = processing.run("geochat:export", parameters)
        assert results["EXPORTED"] == original.featureCount()
        assert results["OUTPUT"] == str(output)
        layer = QgsVectorLayer(str(output), name, "ogr")
        assert layer.isValid()
        assert layer.featureCount() == original.featureCount()
        assert layer.crs().authid() == (crs or "EPSG:3857")
        assert sorted((f["label"], f["run_id"]) for f in layer.getFeatures()) == \
            sorted((f["label"], f["run_id"]) for f in original.getFeatures())
        if crs is None:  # (QGIS reads GeoJSON's ISO dates as dates: compared in the shapefile)
            assert features_of(output) == features_of(source)
            assert {f["created"] for f in layer.getFeatures()} == \
                {f["created"] for f in original.getFeatures()}
    assert not list(tmp_path.glob(".*partial*"))
    assert not forbidden_modules()


def test_export_into_a_geopackage_layer(detect_run, provider, tmp_path):
    """The dialog's "Save to GeoPackage...": a named layer, the file's other layers kept."""
    import processing

    _, source, _ = detect_run
    package = tmp_path / "results.gpkg"
    processing.run("geochat:export", {"INPUT": str(source), "OUTPUT": str(package)})
    target = f"ogr:dbname='{package}' table=\"cars\" (geom)"
    results = processing.run("geochat:export", {"INPUT": str(source), "OUTPUT": target})
    assert results["OUTPUT"] == str(package)
    for name in ("results", "cars"):
        layer = QgsVectorLayer(f"{package}|layername={name}", name, "ogr")
        assert layer.isValid() and layer.featureCount() == results["EXPORTED"] > 0


def test_export_refuses_an_unknown_format(detect_run, provider, tmp_path):
    import processing

    _, source, _ = detect_run
    with pytest.raises(QgsProcessingException, match=r"\.shp, \.gpkg or \.geojson"):
        processing.run("geochat:export", {"INPUT": str(source),
                                          "OUTPUT": str(tmp_path / "cars.kml")})
    assert not list(tmp_path.iterdir())


def test_describe_writes_html_and_tile_footprints(provider, demo_raster, tmp_path):
    import processing

    html = tmp_path / "answer.html"
    results = processing.run("geochat:describe", {
        "INPUT": str(demo_raster), "TASK": "caption", "MODEL": MODEL,
        "MAX_NEW_TOKENS": 16, "OUTPUT_HTML": str(html), "OUTPUT": "memory:"})
    text = html.read_text(encoding="utf-8")
    assert results["OUTPUT_HTML"] == str(html)
    assert text.startswith("<!DOCTYPE html>") and "<h1>GeoChat caption: cogeo.tif</h1>" in text
    assert text.count("<section>") == 1  # the overview: the whole 1024 px raster as one tile
    footprints = results["OUTPUT"]
    assert footprints.featureCount() == 1
    assert footprints.crs().authid() == "EPSG:3857"
    feature = next(footprints.getFeatures())
    assert feature["answer"] == results["ANSWER"] and results["ANSWER"]
    raster_extent = QgsRasterLayer(str(demo_raster), "r").extent()
    assert feature.geometry().boundingBox().contains(raster_extent.buffered(-0.01))


def runtime_cli(*arguments: str, cache: str) -> str:
    """``python -m geochat_qgis ARGUMENTS`` in the runtime's interpreter; its stdout."""
    python = shlex.split(os.environ["GEOCHAT_RUNTIME_PYTHON"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GEOCHAT_CACHE": cache}
    done = subprocess.run([*python, "-m", "geochat_qgis", *arguments], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_describe_with_the_transformers_backend(provider, demo_raster, runtime, tmp_path):
    """BACKEND=transformers on a tiny random-weight HF checkpoint (made by the runtime): the
    answer is the one ``python -m geochat_qgis ask`` gives for the same question and extent."""
    import processing

    checkpoint = tmp_path / "hf"
    runtime_cli("make-tiny-model", str(checkpoint), "--format", "hf", "--seed", "0",
                cache=runtime)
    extent = corner(demo_raster, 300, 300)
    answers = tmp_path / "answers.txt"
    results = processing.run("geochat:describe", {
        "INPUT": str(demo_raster), "EXTENT": corner_extent(demo_raster, 300, 300),
        "TASK": "vqa", "PROMPT": "Is there a road?", "MODEL": str(checkpoint),
        "BACKEND": "transformers", "MAX_NEW_TOKENS": 12, "OUTPUT_HTML": str(answers),
        "OUTPUT": "memory:"})
    said = runtime_cli("ask", str(demo_raster), "--model", str(checkpoint), "--backend",
                       "transformers", "--task", "vqa", "--prompt", "Is there a road?",
                       "--max-new-tokens", "12", "--extent=" + ",".join(map(str, extent)),
                       cache=runtime)
    assert results["ANSWER"] and said.startswith(results["ANSWER"])
    assert results["ANSWER"] in answers.read_text(encoding="utf-8")
    assert next(results["OUTPUT"].getFeatures())["answer"] == results["ANSWER"]


def test_describe_per_tile_to_text(provider, demo_raster, tmp_path):
    import processing

    answers = tmp_path / "answers.txt"
    results = processing.run("geochat:describe", {
        "INPUT": str(demo_raster), "EXTENT": corner_extent(demo_raster, 1024, 300),
        "PROMPT": "What is here?", "TASK": "chat", "OVERVIEW": False,
        "MODEL": MODEL, "MAX_NEW_TOKENS": 8, "OUTPUT_HTML": str(answers),
        "OUTPUT": "memory:"})
    text = answers.read_text(encoding="utf-8")
    tiles = sorted(f["tile_id"] for f in results["OUTPUT"].getFeatures())
    assert tiles == ["r0_c0", "r0_c1", "r0_c2"]  # 1024 px wide: three 504 px tiles
    for tile in tiles:
        assert f"[tile {tile}] What is here?" in text
    assert all(not f.geometry().isEmpty() for f in results["OUTPUT"].getFeatures())


def test_repeated_exports_of_a_memory_layer_on_the_task_manager(provider, tmp_path):
    """A memory layer (as the dock's or a model's) is staged by QGIS and exported by the
    runtime, on the task manager's pooled threads, again and again."""
    layer = QgsVectorLayer("Polygon?crs=EPSG:3857", "detections", "memory")
    layer.dataProvider().addAttributes([QgsField("label", QVariant.String),
                                        QgsField("tile_id", QVariant.String)])
    layer.updateFields()
    feature = QgsFeature(layer.fields())
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(0, 0, 10, 10)))
    feature.setAttributes(["car", "r0_c0"])
    assert layer.dataProvider().addFeatures([feature])[0]
    for run in range(3):
        output = tmp_path / f"run{run}.geojson"
        ok, results = run_task("geochat:export", {"INPUT": layer, "CRS": "EPSG:4326",
                                                  "OUTPUT": str(output)},
                               QgsProcessingFeedback(), timeout=60)
        assert ok and results["EXPORTED"] == 1
        written = QgsVectorLayer(str(output), "written", "ogr")
        assert written.featureCount() == 1 and written.crs().authid() == "EPSG:4326"
        assert [(f["label"], f["tile_id"]) for f in written.getFeatures()] == [("car", "r0_c0")]


# what processing/* may import besides qgis and the standard library (relative to the package)
PLUGIN_MODULES_ALLOWED = {"client", "toolbelt.fields", "__about__", "gui.result_layers"}


def test_processing_imports_only_qgis_the_standard_library_and_the_client():
    """Every import in processing/*, at the top or inside a function (branches no test runs
    included): qgis, the standard library, the stdlib-only client and qgis-only modules."""
    import ast

    package = ROOT / "geochat_qgis"
    offenders = []
    for path in sorted((package / "processing").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [(alias.name, 0) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "", node.level)]
            else:
                continue
            for name, level in names:
                if level == 0:
                    ok = name.split(".")[0] in {"qgis", "__future__"} | sys.stdlib_module_names
                elif level == 1:
                    ok = True  # processing's own modules
                else:
                    ok = name in PLUGIN_MODULES_ALLOWED
                if not ok:
                    offenders.append(f"{path.name}: {'.' * level}{name}")
    assert offenders == []


FRESH_RUN = """
import json, sys
from qgis.core import QgsApplication, QgsVectorLayer
app = QgsApplication([], False)
app.initQgis()
sys.path.append(QgsApplication.pkgDataPath() + "/python/plugins")
from processing.core.Processing import Processing
Processing.initialize()
import processing
qgis_own = [m for m in json.loads(sys.argv[4]) if m in sys.modules]  # QGIS 3.40 imports numpy
from geochat_qgis.processing.provider import GeoChatProvider
provider = GeoChatProvider()
QgsApplication.processingRegistry().addProvider(provider)
raster, extent, folder = sys.argv[1:4]
common = {"INPUT": raster, "EXTENT": extent, "MODEL": "tiny-demo", "MAX_NEW_TOKENS": 8}
seen = {}
def check(step):
    seen[step] = [m for m in json.loads(sys.argv[4]) if m in sys.modules and m not in qgis_own]
check("loaded")
found = processing.run("geochat:detect", {**common, "PROMPT": "car", "GRAMMAR": True,
                                          "OUTPUT": folder + "/d.gpkg"})
check("detect")
processing.run("geochat:export", {"INPUT": found["OUTPUT"], "CRS": "EPSG:4326",
                                  "OUTPUT": folder + "/d.geojson"})
check("export")
processing.run("geochat:describe", {**common, "TASK": "caption",
                                    "OUTPUT_HTML": folder + "/a.html", "OUTPUT": "memory:"})
check("describe")
if sys.argv[5] == "torch":  # GeoPixel needs torch in the runtime (not on Debian 13's)
    masks = processing.run("geochat:segment", {**common, "PROMPT": "car",
                                               "MODEL": "tiny-geopixel-demo", "DEVICE": "cpu",
                                               "MAX_NEW_TOKENS": 16,
                                               "OUTPUT": folder + "/m.gpkg"})
    assert masks["DETECTIONS"] > 0, masks  # the GeoPixel demo's masks, torch in the runtime only
    check("segment")
QgsApplication.processingRegistry().removeProvider(provider)
seen["qgis_own"] = qgis_own
print(json.dumps(seen))
"""


def runtime_has_torch() -> bool:
    """Whether the runtime child's Python (GEOCHAT_RUNTIME_PYTHON in this tier) imports torch."""
    python = os.environ.get("GEOCHAT_RUNTIME_PYTHON") or sys.executable
    return subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0


def test_a_fresh_qgis_process_holds_no_core_package_after_each_algorithm(demo_raster, runtime,
                                                                        tmp_path):
    """In a QGIS Python process of its own (no other test's imports), after the provider
    loads and after detect, export, describe and segment ran, sys.modules holds none of the
    core's packages (issue 11)."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(ROOT), GEOCHAT_CACHE=runtime, QT_QPA_PLATFORM="offscreen")
    torch = "torch" if runtime_has_torch() else "no-torch"
    done = subprocess.run(
        [sys.executable, "-c", FRESH_RUN, str(demo_raster), corner_extent(demo_raster, 200, 200),
         str(tmp_path), json.dumps(FORBIDDEN), torch],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(seen.pop("qgis_own")) <= {"numpy"}  # what QGIS itself imported, not the plugin
    steps = ["loaded", "detect", "export", "describe"] + (["segment"] if torch == "torch" else [])
    assert list(seen) == steps
    assert all(found == [] for found in seen.values()), seen
    assert (tmp_path / "d.geojson").exists() and (tmp_path / "a.html").exists()


def test_this_session_imported_no_core_package_in_its_runs():
    """Last: every algorithm this module ran added none of the core's packages here."""
    assert not forbidden_modules()
