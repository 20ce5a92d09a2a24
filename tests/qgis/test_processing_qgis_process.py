"""``qgis_process run geochat:detect`` against the plugin installed from its zip, nothing of the
project's .venv on its path: the model runs in the runtime child (GEOCHAT_RUNTIME_PYTHON).

qgis_process reads the profiles under $QGIS_CUSTOM_CONFIG_PATH and loads the enabled plugins
of the ``default`` profile that declare ``hasProcessingProvider=yes``. Debian's ``qgis_process``
wrapper passes ``--noversioncheck`` from /etc/default/qgis, which qgis_process 3.22 refuses, so
the binary behind it is run directly.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import QgsRasterLayer, QgsVectorLayer  # noqa: E402

QGIS_PROCESS = shutil.which("qgis_process.bin") or shutil.which("qgis_process")

pytestmark = pytest.mark.skipif(QGIS_PROCESS is None, reason="qgis_process is not installed")


@pytest.fixture(scope="module")
def qgis_process_env(build_module, plugin_zip, tmp_path_factory) -> dict[str, str]:
    """The environment of a qgis_process that sees the plugin, installed as a user would."""
    qgis_dir = tmp_path_factory.mktemp("qgis-process-settings")
    build_module.install(plugin_zip, qgis_dir=qgis_dir, profile="default")
    env = build_module.qgis_env(headless=True)
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(qgis_dir),
               GEOCHAT_CACHE=str(tmp_path_factory.mktemp("models")))
    return env


def qgis_process(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([QGIS_PROCESS, *arguments], env=env, capture_output=True, text=True,
                          timeout=300)


def test_qgis_process_lists_the_algorithms(qgis_process_env):
    listed = qgis_process(qgis_process_env, "list")
    for algorithm in ("geochat:detect", "geochat:segment", "geochat:describe",
                      "geochat:export"):
        assert algorithm in listed.stdout, listed.stderr[-2000:]


def written(path) -> tuple[bool, str, int, set[str]]:
    """(valid, CRS, feature count, labels) of a vector file (no QGIS object outlives the call:
    a layer kept alive by a test's traceback would be destroyed after QGIS has shut down)."""
    layer = QgsVectorLayer(str(path), "written", "ogr")
    return (layer.isValid(), layer.crs().authid(), layer.featureCount(),
            {f["label"] for f in layer.getFeatures()})


def one_tile_extent(raster) -> str:
    """The raster's top-left 200 x 200 pixels (one tile) as a Processing extent string."""
    layer = QgsRasterLayer(str(raster), "r")
    extent, size = layer.extent(), 200 * layer.rasterUnitsPerPixelX()
    xmin, ymax = extent.xMinimum(), extent.yMaximum()
    return f"{xmin},{xmin + size},{ymax - size},{ymax} [{layer.crs().authid()}]"


def test_qgis_process_runs_detect(qgis_process_env, demo_raster, tmp_path):
    output = tmp_path / "detections.gpkg"
    run = qgis_process(
        qgis_process_env, "--json", "run", "geochat:detect", "--",
        f"INPUT={demo_raster}", f"EXTENT={one_tile_extent(demo_raster)}",
        "PROMPT=car", "MODEL=tiny-demo", "BACKEND=llama.cpp", "GRAMMAR=true",
        "MAX_NEW_TOKENS=24", f"OUTPUT={output}")
    assert run.stdout.strip(), run.stderr[-3000:]
    report = json.loads(run.stdout)
    results = report["results"]
    assert report["algorithm_details"]["id"] == "geochat:detect"
    assert results["OUTPUT"] == str(output)
    assert results["TILES_DONE"] == 1
    assert written(output) == (True, "EPSG:3857", results["DETECTIONS"], {"car"})
    assert results["DETECTIONS"] > 0
    assert run.returncode == 0, run.stderr[-3000:]
    assert "No module named" not in run.stderr
    assert runtime_children(qgis_process_env["GEOCHAT_CACHE"]) == []


def runtime_children(cache: str, wait: float = 10.0) -> list[int]:
    """Processes still running with this test's GEOCHAT_CACHE (runtime children qgis_process
    left behind), after up to ``wait`` seconds for them to exit."""
    import time
    from pathlib import Path

    marker = f"GEOCHAT_CACHE={cache}".encode()
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_qgis_process_without_a_runtime_names_the_install_entry(qgis_process_env, demo_raster,
                                                                tmp_path):
    """A runtime interpreter without GeoChat's core: the provider still loads, the run fails
    with the install menu entry in its message, and nothing is written."""
    env = {**qgis_process_env, "GEOCHAT_RUNTIME_PYTHON": "/usr/bin/python3 -I"}
    output = tmp_path / "detections.gpkg"
    run = qgis_process(env, "run", "geochat:detect", "--", f"INPUT={demo_raster}",
                       "PROMPT=car", "MODEL=tiny-demo", f"OUTPUT={output}")
    assert run.returncode != 0
    assert "Raster > GeoChat > Install model dependencies..." in run.stdout + run.stderr
    assert "No module named" not in run.stderr
    assert not output.exists()
