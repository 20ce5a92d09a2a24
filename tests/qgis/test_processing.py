"""The GeoChat Processing algorithms in real QGIS (offscreen), with the tiny random-weight GGUF.

The tiny model's answers are random; GRAMMAR=true makes them boxes, so detections exist and
the whole chain (tiles -> llama.cpp -> parse -> georeference -> merge -> sink) is exercised.
Extents are kept to one or a few 504 px tiles (about 3 s of model time each on two cores).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
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

from geochat_qgis.core.export import FIELDS  # noqa: E402
from geochat_qgis.toolbelt.detection_features import FEATURE_ID_FIELD  # noqa: E402

@pytest.fixture(scope="module")
def provider(qgis_processing):
    """The plugin's Processing provider, registered from the checkout for these tests."""
    from geochat_qgis.processing.provider import GeoChatProvider

    registry = QgsApplication.processingRegistry()
    provider = GeoChatProvider()
    assert registry.addProvider(provider), "another 'geochat' provider is already registered"
    yield provider
    registry.removeProvider(provider)


def corner_extent(raster: Path, width_px: float, height_px: float) -> str:
    """A Processing extent string: the raster's top-left ``width_px`` x ``height_px`` pixels."""
    layer = QgsRasterLayer(str(raster), "r")
    assert layer.isValid(), raster
    extent = layer.extent()
    xmin, ymax = extent.xMinimum(), extent.yMaximum()
    xmax = xmin + width_px * layer.rasterUnitsPerPixelX()
    ymin = ymax - height_px * layer.rasterUnitsPerPixelY()
    return f"{xmin},{xmax},{ymin},{ymax} [{layer.crs().authid()}]"


def detect_parameters(model: Path, raster: Path, prompt: str, output: str, extent: str) -> dict:
    return {"INPUT": str(raster), "EXTENT": extent, "PROMPT": prompt, "TASK": "refer",
            "MODEL": str(model), "BACKEND": "llama.cpp", "GRAMMAR": True,
            "MAX_NEW_TOKENS": 24, "OUTPUT": output}


def features_of(layer: QgsVectorLayer) -> list[tuple[str, str, str]]:
    """(label, tile_id, geometry WKT rounded to cm) of every feature, sorted."""
    return sorted((f["label"], f["tile_id"], f.geometry().asWkt(2))
                  for f in layer.getFeatures())


@pytest.fixture(scope="module")
def detect_run(provider, tiny_gguf, demo_raster, tmp_path_factory):
    """One geochat:detect run into a GeoPackage: (results, output path, parameters)."""
    import processing

    output = tmp_path_factory.mktemp("detect") / "cars.gpkg"
    parameters = detect_parameters(tiny_gguf, demo_raster, "car\nroad", str(output),
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


def test_detect_writes_the_job_results_in_the_raster_crs(detect_run, tiny_gguf, demo_raster):
    """The sink holds exactly what the core's run_job finds for the same job."""
    from geochat_qgis.core.backends.factory import resolve_spec
    from geochat_qgis.core.pipeline import Job, run_job

    results, output, parameters = detect_run
    layer = QgsVectorLayer(str(output), "cars", "ogr")
    assert layer.isValid()
    assert layer.crs().authid() == "EPSG:3857"  # the raster's CRS
    assert [f.name for f in FIELDS] + [FEATURE_ID_FIELD] == [
        name for name in layer.fields().names() if name != "fid"]
    assert results["TILES_DONE"] == 1
    assert results["DETECTIONS"] == layer.featureCount() > 0

    rect = [float(v) for v in parameters["EXTENT"].split(" [")[0].split(",")]
    job = Job(raster=str(demo_raster), prompts=["car", "road"], grammar=True,
              max_new_tokens=24, extent=(rect[0], rect[2], rect[1], rect[3]),
              backend=resolve_spec(str(tiny_gguf), "llama.cpp"))
    expected = run_job(job)
    assert len(expected.detections) == layer.featureCount()
    found = features_of(layer)
    assert {label for label, _, _ in found} <= {"car", "road"}
    assert [(d.label, d.tile_id) for d in sorted(expected.detections,
                                                 key=lambda d: (d.label, d.tile_id))] == [
        (label, tile) for label, tile, _ in found]
    first = next(layer.getFeatures())
    assert first["task"] == "refer" and first["raster"] == str(demo_raster)
    assert first["model"].startswith("llama.cpp") and first["created"]


def test_a_loaded_output_is_styled_like_the_dock_results(provider, tiny_gguf, demo_raster):
    """As the Processing dialog loads outputs: one colour per label, map tips, from the QML."""
    import processing

    results = processing.runAndLoadResults("geochat:detect", detect_parameters(
        tiny_gguf, demo_raster, "car\nroad", "TEMPORARY_OUTPUT",
        corner_extent(demo_raster, 300, 300)))
    layer = QgsProject.instance().mapLayer(results["OUTPUT"])
    try:
        assert layer is not None and layer.featureCount() == results["DETECTIONS"] > 0
        renderer = layer.renderer()
        assert renderer.type() == "categorizedSymbol" and renderer.classAttribute() == "label"
        assert {c.value() for c in renderer.categories()} == {
            f["label"] for f in layer.getFeatures()}
        assert '"phrase"' in layer.mapTipTemplate()
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_detect_runs_only_the_tiles_touching_the_aoi(provider, tiny_gguf, demo_raster):
    """Two small squares (drawn in EPSG:4326) near opposite corners of the 1024 px raster: the
    2 x 2 tiles over their bounds are planned, only the two corner tiles touching them run."""
    import processing

    raster = QgsRasterLayer(str(demo_raster), "r")
    to_wgs84 = QgsCoordinateTransform(raster.crs(), QgsCoordinateReferenceSystem("EPSG:4326"),
                                      QgsProject.instance())
    extent, step = raster.extent(), 60 * raster.rasterUnitsPerPixelX()
    aoi = QgsVectorLayer("Polygon?crs=EPSG:4326", "aoi", "memory")
    squares = []
    for x, y in ((extent.xMinimum() + step, extent.yMaximum() - 2 * step),
                 (extent.xMaximum() - 2 * step, extent.yMinimum() + step)):
        square = QgsGeometry.fromRect(QgsRectangle(x, y, x + step, y + step))
        square.transform(to_wgs84)
        feature = QgsFeature()
        feature.setGeometry(square)
        squares.append(feature)
    assert aoi.dataProvider().addFeatures(squares)[0]

    parameters = detect_parameters(tiny_gguf, demo_raster, "car", "memory:", "")
    parameters["AOI"] = aoi
    del parameters["EXTENT"]
    results = processing.run("geochat:detect", parameters)
    assert results["TILES_DONE"] == 2
    assert {f["tile_id"] for f in results["OUTPUT"].getFeatures()} <= {"r0_c0", "r1_c1"}


def llama_server_class():
    """The tests' ``python -m llama_cpp.server`` runner (tests/unit/test_backend_http_server)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "unit" / "test_backend_http_server.py"
    spec = importlib.util.spec_from_file_location("geochat_llama_server_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LlamaServer


@pytest.mark.slow
def test_detect_through_an_openai_compatible_server(detect_run, tiny_gguf, tmp_path,
                                                   monkeypatch):
    """BACKEND=openai + SERVER_URL (+ the API key from $GEOCHAT_API_KEY) against a real
    llama_cpp.server running the same GGUF: the same features as the in-process run."""
    import processing

    pytest.importorskip("llama_cpp.server")
    server = llama_server_class()(tiny_gguf, tmp_path / "server.log", api_key="key-7")
    monkeypatch.setenv("GEOCHAT_API_KEY", "key-7")
    try:
        _, in_process, parameters = detect_run
        output = tmp_path / "over-http.gpkg"
        results = processing.run("geochat:detect", {
            **parameters, "BACKEND": "openai", "SERVER_URL": server.url,
            "MODEL": server.models["data"][0]["id"], "OUTPUT": str(output)})
    finally:
        server.stop()
    layer = QgsVectorLayer(str(output), "http", "ogr")
    assert results["TILES_DONE"] == 1
    assert features_of(layer) == features_of(QgsVectorLayer(str(in_process), "local", "ogr"))
    assert next(layer.getFeatures())["model"].startswith("openai")


def test_batch_over_two_rasters_and_two_prompts(provider, tiny_gguf, data_dir, tmp_path):
    """Batch rows run one after another, as the batch dialog runs them; the last row goes
    through QgsProcessingAlgRunnerTask on the task manager (a worker thread, as in QGIS)."""
    import processing

    from geochat_qgis.processing import running

    rows = [(data_dir / raster, prompt)
            for raster in ("cogeo.tif", "rgb1_fake_nir_epsg3857.tif")
            for prompt in ("car", "building")]
    outputs = []
    loaded = []
    for index, (raster, prompt) in enumerate(rows[:-1]):
        output = tmp_path / f"row{index}.gpkg"
        results = processing.run("geochat:detect", detect_parameters(
            tiny_gguf, raster, prompt, str(output), corner_extent(raster, 200, 200)))
        outputs.append((results, output, prompt))
        loaded.append(running._CACHES["inprocess"]._backend)
    # the batch loads its model once: every row ran on the same loaded backend
    assert loaded[0] is not None and all(backend is loaded[0] for backend in loaded)

    raster, prompt = rows[-1]
    output = tmp_path / "row3.gpkg"
    ok, results = run_task("geochat:detect", detect_parameters(
        tiny_gguf, raster, prompt, str(output), corner_extent(raster, 200, 200)),
        QgsProcessingFeedback())
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


def test_detect_in_a_model_with_export(provider, tiny_gguf, demo_raster, tmp_path):
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
    for name, value in (("PROMPT", "car"), ("TASK", "refer"), ("MODEL", str(tiny_gguf)),
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
        layer = QgsVectorLayer(str(output), name, "ogr")
        assert layer.isValid()
        assert layer.featureCount() == original.featureCount()
        assert layer.crs().authid() == (crs or "EPSG:3857")
        assert sorted((f["label"], f["run_id"]) for f in layer.getFeatures()) == \
            sorted((f["label"], f["run_id"]) for f in original.getFeatures())
        if crs is None:  # (QGIS reads GeoJSON's ISO dates as dates: compared in the shapefile)
            assert features_of(layer) == features_of(original)
            assert {f["created"] for f in layer.getFeatures()} == \
                {f["created"] for f in original.getFeatures()}
    assert not list(tmp_path.glob(".*partial*"))


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


def test_describe_writes_html_and_tile_footprints(provider, tiny_gguf, demo_raster, tmp_path):
    import processing

    html = tmp_path / "answer.html"
    results = processing.run("geochat:describe", {
        "INPUT": str(demo_raster), "TASK": "caption", "MODEL": str(tiny_gguf),
        "MAX_NEW_TOKENS": 16, "OUTPUT_HTML": str(html), "OUTPUT": "memory:"})
    text = html.read_text(encoding="utf-8")
    assert results["OUTPUT_HTML"] == str(html)
    assert text.startswith("<!DOCTYPE html>") and "<h1>GeoChat caption: cogeo.tif</h1>" in text
    assert text.count("<section>") == 1  # the overview: the whole 1024 px raster as one tile
    footprints = results["OUTPUT"]
    assert footprints.featureCount() == 1
    assert footprints.crs().authid() == "EPSG:3857"
    feature = next(footprints.getFeatures())
    assert feature["answer"] == results["ANSWER"]
    raster_extent = QgsRasterLayer(str(demo_raster), "r").extent()
    assert feature.geometry().boundingBox().contains(raster_extent.buffered(-0.01))


def test_describe_with_the_transformers_backend(provider, demo_raster, tmp_path_factory):
    """BACKEND=transformers on a tiny random-weight HF checkpoint: the answer is the core's."""
    import processing

    from geochat_qgis.core.backends.factory import resolve_spec
    from geochat_qgis.core.pipeline import Job, run_job
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    checkpoint = build_tiny_geochat(tmp_path_factory.mktemp("tiny-hf") / "hf", "hf", seed=0)
    extent = corner_extent(demo_raster, 300, 300)
    answers = tmp_path_factory.mktemp("describe") / "answers.txt"
    results = processing.run("geochat:describe", {
        "INPUT": str(demo_raster), "EXTENT": extent, "TASK": "vqa",
        "PROMPT": "Is there a road?", "MODEL": str(checkpoint), "BACKEND": "transformers",
        "MAX_NEW_TOKENS": 12, "OUTPUT_HTML": str(answers), "OUTPUT": "memory:"})
    rect = [float(v) for v in extent.split(" [")[0].split(",")]
    expected = run_job(Job(raster=str(demo_raster), task="vqa", prompts=["Is there a road?"],
                           extent=(rect[0], rect[2], rect[1], rect[3]), max_new_tokens=12,
                           backend=resolve_spec(str(checkpoint), "transformers")))
    assert len(expected.answers) == 1 and expected.answers[0].raw
    assert results["ANSWER"] == (expected.answers[0].text or expected.answers[0].raw)
    assert results["ANSWER"] in answers.read_text(encoding="utf-8")
    assert next(results["OUTPUT"].getFeatures())["answer"] == results["ANSWER"]


def test_describe_per_tile_to_text(provider, tiny_gguf, demo_raster, tmp_path):
    import processing

    answers = tmp_path / "answers.txt"
    results = processing.run("geochat:describe", {
        "INPUT": str(demo_raster), "EXTENT": corner_extent(demo_raster, 1024, 300),
        "PROMPT": "What is here?", "TASK": "chat", "OVERVIEW": False,
        "MODEL": str(tiny_gguf), "MAX_NEW_TOKENS": 8, "OUTPUT_HTML": str(answers),
        "OUTPUT": "memory:"})
    text = answers.read_text(encoding="utf-8")
    tiles = sorted(f["tile_id"] for f in results["OUTPUT"].getFeatures())
    assert tiles == ["r0_c0", "r0_c1", "r0_c2"]  # 1024 px wide: three 504 px tiles
    for tile in tiles:
        assert f"[tile {tile}] What is here?" in text


def test_segment_without_cuda_fails_with_the_core_message(provider, demo_raster, tmp_path):
    import processing

    from geochat_qgis.core.backends.geopixel import NEEDS_GPU, cuda_available

    if cuda_available():
        pytest.skip("this machine has CUDA: the refusal cannot be seen here")
    with pytest.raises(QgsProcessingException) as raised:
        processing.run("geochat:segment", {
            "INPUT": str(demo_raster), "PROMPT": "building", "MODEL": str(tmp_path),
            "OUTPUT": str(tmp_path / "masks.gpkg")})
    assert str(raised.value) == NEEDS_GPU
    assert not (tmp_path / "masks.gpkg").exists()


def test_cancel_from_the_progress_callback_stops_within_one_tile(provider, tiny_gguf,
                                                                  demo_raster):
    """Three tiles planned; the feedback is cancelled when the first one reports progress:
    the run ends there and keeps that tile's detections."""
    import processing

    feedback = QgsProcessingFeedback()
    progress: list[float] = []

    def on_progress(value: float) -> None:
        progress.append(value)
        feedback.cancel()

    feedback.progressChanged.connect(on_progress)
    results = processing.run("geochat:detect", detect_parameters(
        tiny_gguf, demo_raster, "car", "memory:", corner_extent(demo_raster, 1024, 300)),
        feedback=feedback)
    assert progress and progress[0] == pytest.approx(100 / 3)
    assert max(progress) < 100
    assert results["TILES_DONE"] == 1
    layer = results["OUTPUT"]
    assert layer.featureCount() == results["DETECTIONS"]
    assert {f["tile_id"] for f in layer.getFeatures()} <= {"r0_c0"}


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


def test_cancel_from_the_gui_thread_stops_the_worker_within_a_tile(provider, tiny_gguf,
                                                                   demo_raster, tmp_path):
    """The dialog's Cancel: feedback.cancel() on the main thread while the algorithm runs on
    the task manager's thread. The first tile's progress cancels; the second tile is stopped
    between tokens, the third never starts; the finished tile's detections are written."""
    feedback = QgsProcessingFeedback()
    seen: list[float] = []

    def on_progress(value: float) -> None:  # queued to this (the main) thread
        seen.append(value)
        feedback.cancel()

    feedback.progressChanged.connect(on_progress)
    output = tmp_path / "cancelled.gpkg"
    ok, results = run_task("geochat:detect", detect_parameters(
        tiny_gguf, demo_raster, "car", str(output), corner_extent(demo_raster, 1024, 300)),
        feedback)
    assert seen and seen[0] == pytest.approx(100 / 3) and max(seen) < 100
    assert feedback.isCanceled()
    assert results["TILES_DONE"] == 1
    layer = QgsVectorLayer(str(output), "cancelled", "ogr")
    assert layer.featureCount() == results["DETECTIONS"]
    assert {f["tile_id"] for f in layer.getFeatures()} <= {"r0_c0"}


def test_repeated_exports_on_the_task_manager(provider, tmp_path):
    """Each export reprojects with pyproj on one of the task manager's pooled threads. pyproj
    frees a pooled thread's PROJ context when the thread leaves Python yet uses it again on the
    thread's next visit: without core.threads the second run crashed (proj_as_wkt)."""
    from shapely.geometry import box

    from geochat_qgis.core.results import Detection
    from geochat_qgis.toolbelt.detection_features import detection_features, memory_layer

    layer = memory_layer("detections", QgsCoordinateReferenceSystem("EPSG:3857"))
    detections = [Detection("car", box(0, 0, 10, 10), frame="crs", crs="EPSG:3857")]
    layer.dataProvider().addFeatures(detection_features(detections, layer.fields()))
    for run in range(4):
        output = tmp_path / f"run{run}.geojson"
        ok, results = run_task("geochat:export", {"INPUT": layer, "CRS": "EPSG:4326",
                                                  "OUTPUT": str(output)},
                               QgsProcessingFeedback(), timeout=60)
        assert ok and results["EXPORTED"] == 1
        written = QgsVectorLayer(str(output), "written", "ogr")
        assert written.featureCount() == 1 and written.crs().authid() == "EPSG:4326"


def test_model_errors_are_processing_exceptions(provider, demo_raster):
    import processing

    with pytest.raises(QgsProcessingException, match="neither a model file or folder"):
        processing.run("geochat:detect", {"INPUT": str(demo_raster), "PROMPT": "car",
                                          "MODEL": "no-such-model", "OUTPUT": "memory:"})
