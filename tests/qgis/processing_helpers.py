"""What the Processing tests share: the runtime child (its own model cache), the provider, one
detect run, parameters and readers. Imported by test_processing*.py (fixtures included)."""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsGeometry,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)


ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-demo"
# what QGIS's process must never hold (issue 11): the core's packages live in the runtime
FORBIDDEN = ("numpy", "shapely", "rasterio", "pyproj", "pyogrio", "geopandas", "PIL", "torch",
             "transformers", "llama_cpp", "gguf")


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


@pytest.fixture(scope="module")
def detect_run(provider, demo_raster, tmp_path_factory):
    """One geochat:detect run into a GeoPackage: (results, output path, parameters)."""
    import processing

    output = tmp_path_factory.mktemp("detect") / "cars.gpkg"
    parameters = detect_parameters(demo_raster, "car\nroad", str(output),
                                   corner_extent(demo_raster, 300, 300))
    return processing.run("geochat:detect", parameters), output, parameters


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
