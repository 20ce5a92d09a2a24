"""The GeoChat Processing algorithms in real QGIS (offscreen), the model in the runtime child.

QGIS's process holds only QGIS: these tests run under .venv-qgis (no core package importable)
with ``GEOCHAT_RUNTIME_PYTHON`` naming the runtime's interpreter (.venv). The model is the tiny
random-weight demo ("tiny-demo", built by the child on first use); GRAMMAR=true makes its
answers boxes, so detections exist and the whole chain (request -> runtime -> tiles ->
llama.cpp -> parse -> georeference -> merge -> GeoPackage) runs. Extents are kept to one or a
few 504 px tiles (about a second of model time each).
"""
from __future__ import annotations

import importlib
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
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
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


ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-demo"
# what QGIS's process must never hold (issue 11): the core's packages live in the runtime
FORBIDDEN = ("numpy", "shapely", "rasterio", "pyproj", "pyogrio", "geopandas", "PIL", "torch",
             "transformers", "llama_cpp", "gguf")
# the core's export schema, in order (core/export.py FIELDS; more provenance may follow)
SCHEMA = ["label", "phrase", "task", "prompt", "model", "angle", "score", "kind", "flags",
          "tile_id", "raster", "run_id", "created"]


# core packages other tests of the session imported before this module (e.g. a fixture that
# builds a model in process): the in-session checks see only what this module's runs add; the
# fresh-process test at the end sees everything
_BEFORE: set[str] = set()


def shared_client():
    """The runtime client the algorithms use: looked up at each call, as unloading the plugin
    (an earlier test of the session) makes QGIS drop and re-import the package's modules."""
    return importlib.import_module("geochat_qgis.client").shared_client()


def close_shared_client() -> None:
    importlib.import_module("geochat_qgis.client").close_shared_client()


def forbidden_modules() -> list[str]:
    """The forbidden modules imported since this module started."""
    return [name for name in FORBIDDEN if name in sys.modules and name not in _BEFORE]


@pytest.fixture(scope="module", autouse=True)
def runtime(tmp_path_factory):
    """The runtime child with its own model cache (the demo model is built there once)."""
    if not os.environ.get("GEOCHAT_RUNTIME_PYTHON"):
        pytest.skip("set GEOCHAT_RUNTIME_PYTHON to the runtime's interpreter (.venv/bin/python)")
    _BEFORE.update(name for name in FORBIDDEN if name in sys.modules)
    saved = os.environ.get("GEOCHAT_CACHE")
    os.environ["GEOCHAT_CACHE"] = str(tmp_path_factory.mktemp("models"))
    close_shared_client()  # a child started before would not see the cache
    yield os.environ["GEOCHAT_CACHE"]
    close_shared_client()
    if saved is None:
        os.environ.pop("GEOCHAT_CACHE", None)
    else:
        os.environ["GEOCHAT_CACHE"] = saved


@pytest.fixture(scope="module")
def provider(qgis_processing):
    """The plugin's Processing provider, registered from the checkout for these tests."""
    from geochat_qgis.processing.provider import GeoChatProvider

    registry = QgsApplication.processingRegistry()
    provider = GeoChatProvider()
    assert registry.addProvider(provider), "another 'geochat' provider is already registered"
    yield provider
    registry.removeProvider(provider)


def corner(raster: Path, width_px: float, height_px: float) -> tuple[float, ...]:
    """(xmin, ymin, xmax, ymax): the raster's top-left ``width_px`` x ``height_px`` pixels."""
    layer = QgsRasterLayer(str(raster), "r")
    assert layer.isValid(), raster
    extent = layer.extent()
    xmin, ymax = extent.xMinimum(), extent.yMaximum()
    return (xmin, ymax - height_px * layer.rasterUnitsPerPixelY(),
            xmin + width_px * layer.rasterUnitsPerPixelX(), ymax)


def corner_extent(raster: Path, width_px: float, height_px: float) -> str:
    """A Processing extent string of :func:`corner`."""
    xmin, ymin, xmax, ymax = corner(raster, width_px, height_px)
    return f"{xmin},{xmax},{ymin},{ymax} [{QgsRasterLayer(str(raster), 'r').crs().authid()}]"


def detect_parameters(raster: Path, prompt: str, output: str, extent: str) -> dict:
    return {"INPUT": str(raster), "EXTENT": extent, "PROMPT": prompt, "TASK": "refer",
            "MODEL": MODEL, "BACKEND": "llama.cpp", "GRAMMAR": True,
            "MAX_NEW_TOKENS": 24, "OUTPUT": output}


def features_of(path) -> list[tuple[str, str, str]]:
    """(label, tile_id, geometry WKT rounded to cm, as multi-polygons: a shapefile reads so)
    of every feature, sorted."""
    layer = QgsVectorLayer(str(path), "features", "ogr")
    assert layer.isValid(), path
    found = []
    for feature in layer.getFeatures():
        geometry = QgsGeometry(feature.geometry())
        geometry.convertToMultiType()
        found.append((feature["label"], feature["tile_id"], geometry.asWkt(2)))
    return sorted(found)


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


@pytest.fixture(scope="module")
def detect_run(provider, demo_raster, tmp_path_factory):
    """One geochat:detect run into a GeoPackage: (results, output path, parameters)."""
    import processing

    output = tmp_path_factory.mktemp("detect") / "cars.gpkg"
    parameters = detect_parameters(demo_raster, "car\nroad", str(output),
                                   corner_extent(demo_raster, 300, 300))
    return processing.run("geochat:detect", parameters), output, parameters


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


def test_an_aoi_without_polygons_is_refused_by_name(provider, demo_raster, tmp_path):
    import processing

    empty = QgsVectorLayer("Polygon?crs=EPSG:4326", "my fields", "memory")
    parameters = detect_parameters(demo_raster, "car", str(tmp_path / "out.gpkg"), "")
    parameters["AOI"] = empty
    with pytest.raises(QgsProcessingException, match="The area of interest my fields has no "
                                                     "polygons"):
        processing.run("geochat:detect", parameters)
    assert not list(tmp_path.iterdir())


def test_bad_bands_and_formats_are_refused_before_the_run(provider, demo_raster, tmp_path):
    import processing

    parameters = detect_parameters(demo_raster, "car", str(tmp_path / "out.gpkg"),
                                   corner_extent(demo_raster, 100, 100))
    with pytest.raises(QgsProcessingException, match="not a list of band numbers"):
        processing.run("geochat:detect", {**parameters, "BANDS": "red,green"})
    with pytest.raises(QgsProcessingException, match=r"\.shp, \.gpkg or \.geojson"):
        processing.run("geochat:detect", {**parameters, "OUTPUT": str(tmp_path / "out.kml")})
    assert not list(tmp_path.iterdir())


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
    results = processing.run(model, {"raster": str(demo_raster),
                                     "extent": corner_extent(demo_raster, 300, 300),
                                     "export:exported": str(output)})
    layer = QgsVectorLayer(str(output), "exported", "ogr")
    assert results["export:exported"] == str(output)
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


class RecordingFeedback(QgsProcessingFeedback):
    """A feedback that keeps the warnings it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []

    def pushWarning(self, warning: str) -> None:  # noqa: N802 - QGIS API
        self.warnings.append(warning)
        super().pushWarning(warning)

    def reportError(self, error: str, fatalError: bool = False) -> None:  # noqa: N802,N803
        self.warnings.append(error)
        super().reportError(error, fatalError)


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
    return {**detect_parameters(raster, "car", str(output), corner_extent(raster, width_px, 200)),
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
    feedback = RecordingFeedback()
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
    feedback = RecordingFeedback()
    parameters = {**served_parameters(demo_raster, output, 1024, server.url),
                  "EXTENT": corner_extent(demo_raster, 1024, 600)}
    try:
        results = processing.run("geochat:detect", parameters, feedback=feedback)
    finally:
        server.stop()
    assert results["TILES_DONE"] == 4 and results["DETECTIONS"] == 0
    assert sorted(w[:10] for w in feedback.warnings if "HTTP 500" in w) == ["Tile r1_c1",
                                                                             "Tile r1_c2"]
    assert "2 of 6 tiles failed: the output has nothing from their areas." in feedback.warnings
    assert QgsVectorLayer(str(output), "some", "ogr").isValid()


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


def test_segment_without_a_gpu_fails_with_a_clear_message(provider, demo_raster, tmp_path):
    import processing

    if shared_client().status()["gpus"]:
        pytest.skip("this machine has an NVIDIA GPU: the refusal cannot be seen here")
    with pytest.raises(QgsProcessingException, match="GeoPixel needs an NVIDIA GPU with CUDA"):
        processing.run("geochat:segment", {
            "INPUT": str(demo_raster), "PROMPT": "building", "MODEL": str(tmp_path),
            "OUTPUT": str(tmp_path / "masks.gpkg")})
    assert not (tmp_path / "masks.gpkg").exists()


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
    results = processing.run("geochat:detect", detect_parameters(
        demo_raster, "car", str(output), corner_extent(demo_raster, 1024, 300)),
        feedback=feedback)
    assert progress and progress[0] == pytest.approx(100 / 3)
    assert max(progress) < 100
    assert results["TILES_DONE"] == 1
    assert output.read_bytes() == before
    partial = Path(results["OUTPUT"])
    assert partial.parent == tmp_path and partial.name.startswith("cars-partial-")
    assert {tile for _, tile, _ in features_of(partial)} <= {"r0_c0"}
    assert len(features_of(partial)) == results["DETECTIONS"]


def test_a_run_stopped_early_loads_the_file_it_wrote(provider, demo_raster, detect_run,
                                                     tmp_path):
    """As the dialog loads outputs: a run stopped by an error (here the runtime killed after
    the first tile) over an existing file loads the partial file it wrote beside it, not the
    old one. (A cancelled run loads nothing: QGIS skips loading after a cancel.)"""
    import signal

    import processing

    _, earlier, _ = detect_run
    output = tmp_path / "cars.gpkg"
    output.write_bytes(earlier.read_bytes())
    before = output.read_bytes()
    killed: list[int] = []

    def kill_once(value: float) -> None:  # a Qt slot: raising here would abort the process
        pid = shared_client().pid
        if not killed and pid:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(kill_once)
    results = processing.runAndLoadResults("geochat:detect", detect_parameters(
        demo_raster, "car", str(output), corner_extent(demo_raster, 1024, 300)),
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
        processing.run("geochat:detect", detect_parameters(
            data_dir / "all-nodata.tif", "car", str(output), ""))
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cars.gpkg"]


def test_a_raster_without_a_crs_is_refused_with_what_to_do(provider, data_dir, tmp_path):
    import processing

    raster = data_dir / "float_nan.tif"
    assert not QgsRasterLayer(str(raster), "r").crs().isValid()
    with pytest.raises(QgsProcessingException, match="has no coordinate reference system: "
                                                     "set it"):
        processing.run("geochat:detect", detect_parameters(raster, "car",
                                                           str(tmp_path / "out.gpkg"), ""))
    assert not list(tmp_path.iterdir())


def test_a_runtime_killed_mid_run_keeps_the_finished_tile(provider, demo_raster, tmp_path):
    """The runtime child is SIGKILLed (as the out-of-memory killer does) after the first of
    three tiles: a fresh child writes that tile, the run reports the death as an error, and
    the next run works in yet another child."""
    import signal

    import processing

    feedback = RecordingFeedback()
    killed: list[int] = []

    def on_progress(value: float) -> None:  # a Qt slot: raising here would abort the process
        pid = shared_client().pid
        if not killed and pid:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    feedback.progressChanged.connect(on_progress)
    output = tmp_path / "killed.gpkg"
    results = processing.run("geochat:detect", detect_parameters(
        demo_raster, "car", str(output), corner_extent(demo_raster, 1024, 300)),
        feedback=feedback)
    assert killed and results["TILES_DONE"] >= 1
    assert results["OUTPUT"] == str(output)
    found = features_of(output)
    assert len(found) == results["DETECTIONS"]
    assert {tile for _, tile, _ in found} <= {"r0_c0", "r0_c1"}
    assert any("SIGKILL" in w for w in feedback.warnings), feedback.warnings
    again = processing.run("geochat:detect", detect_parameters(
        demo_raster, "car", "TEMPORARY_OUTPUT", corner_extent(demo_raster, 200, 200)))
    assert again["TILES_DONE"] == 1 and shared_client().pid not in (None, killed[0])


# The task keeps references to its context and feedback and the task manager deletes it later,
# as QGIS's dialog keeps them: they must outlive it (here: the session).
_TASK_OBJECTS: list = []


def run_task(algorithm_id: str, parameters: dict, feedback: QgsProcessingFeedback,
             timeout: float = 120) -> tuple[bool, dict]:
    """Run an algorithm as the Processing dialog does: a QgsProcessingAlgRunnerTask on the task
    manager (a worker thread), the event loop turning here; (ok, results)."""
    algorithm = QgsApplication.processingRegistry().createAlgorithmById(algorithm_id)
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    _TASK_OBJECTS.append((algorithm, context, feedback))
    task = QgsProcessingAlgRunnerTask(algorithm, parameters, context, feedback)
    done: list[tuple[bool, dict]] = []
    task.executed.connect(lambda ok, results: done.append((ok, results)))
    QgsApplication.taskManager().addTask(task)
    deadline = time.monotonic() + timeout
    while not done and time.monotonic() < deadline:
        QgsApplication.processEvents()
        time.sleep(0.01)
    assert done, f"{algorithm_id} did not finish within {timeout} s"
    return done[0]


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
    ok, results = run_task("geochat:detect", detect_parameters(
        demo_raster, "car", str(output), corner_extent(demo_raster, 1024, 300)), feedback)
    assert seen and seen[0] == pytest.approx(100 / 3) and max(seen) < 100
    assert feedback.isCanceled()
    assert results["TILES_DONE"] == 1
    assert results["OUTPUT"] == str(output)  # no file was there: the finished tile goes in
    assert len(features_of(output)) == results["DETECTIONS"]
    assert {tile for _, tile, _ in features_of(output)} <= {"r0_c0"}


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

    close_shared_client()
    monkeypatch.setenv("GEOCHAT_RUNTIME_PYTHON", "/usr/bin/python3 -I")
    try:
        with pytest.raises(QgsProcessingException) as raised:
            processing.run("geochat:detect", detect_parameters(
                demo_raster, "car", str(tmp_path / "out.gpkg"),
                corner_extent(demo_raster, 100, 100)))
        message = str(raised.value)
        assert "Raster > GeoChat > Install model dependencies..." in message
        assert "geochat_qgis" in message  # what that interpreter lacks
        assert shared_client().pid is None  # no child was started
    finally:
        close_shared_client()
    assert not list(tmp_path.iterdir())


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
from geochat_qgis.processing.provider import GeoChatProvider
provider = GeoChatProvider()
QgsApplication.processingRegistry().addProvider(provider)
raster, extent, folder = sys.argv[1:4]
common = {"INPUT": raster, "EXTENT": extent, "MODEL": "tiny-demo", "MAX_NEW_TOKENS": 8}
seen = {}
def check(step):
    seen[step] = [m for m in json.loads(sys.argv[4]) if m in sys.modules]
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
try:
    processing.run("geochat:segment", {**common, "PROMPT": "car", "MODEL": folder,
                                       "OUTPUT": folder + "/m.gpkg"})
except Exception as exc:  # no GPU here: refused; with one: no weights in that folder
    print("segment:", exc, file=sys.stderr)
check("segment")
QgsApplication.processingRegistry().removeProvider(provider)
print(json.dumps(seen))
"""


def test_a_fresh_qgis_process_holds_no_core_package_after_each_algorithm(demo_raster, runtime,
                                                                        tmp_path):
    """In a QGIS Python process of its own (no other test's imports), after the provider
    loads and after detect, export, describe and segment ran, sys.modules holds none of the
    core's packages (issue 11)."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(ROOT), GEOCHAT_CACHE=runtime, QT_QPA_PLATFORM="offscreen")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_RUN, str(demo_raster), corner_extent(demo_raster, 200, 200),
         str(tmp_path), json.dumps(FORBIDDEN)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(seen) == ["loaded", "detect", "export", "describe", "segment"]
    assert all(found == [] for found in seen.values()), seen
    assert (tmp_path / "d.geojson").exists() and (tmp_path / "a.html").exists()


def test_this_session_imported_no_core_package_in_its_runs():
    """Last: every algorithm this module ran added none of the core's packages here."""
    assert not forbidden_modules()
