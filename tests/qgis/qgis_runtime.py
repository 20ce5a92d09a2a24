"""What the QGIS tests share about the runtime child: its interpreter, what QGIS's process must
never import."""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest
from qgis.core import QgsApplication, QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QCoreApplication, QElapsedTimer, QTimer

from geochat_qgis.gui.dock import GeoChatDock

# What QGIS's process must never hold (issue 11): the core's packages live in the runtime.
FORBIDDEN = ("numpy", "shapely", "rasterio", "pyproj", "pyogrio", "geopandas", "PIL", "torch",
             "transformers", "llama_cpp", "gguf")


def runtime_python() -> list[str]:
    """The runtime's interpreter (GEOCHAT_RUNTIME_PYTHON, e.g. .venv/bin/python); skip without."""
    value = os.environ.get("GEOCHAT_RUNTIME_PYTHON", "").strip()
    if not value:
        pytest.skip("set GEOCHAT_RUNTIME_PYTHON to the runtime's interpreter (.venv/bin/python)")
    return [value] if Path(value).is_file() else shlex.split(value)


def run_until_done(dock, timeout: float = 120.0) -> float:
    """Spin the event loop until the dock's task ends; returns the longest main-thread stall (ms)."""
    gaps = []
    clock = QElapsedTimer()
    clock.start()

    def tick():
        gaps.append(clock.restart())

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    deadline = time.monotonic() + timeout
    idle_rounds = 0  # planning, then running: idle must last a while to count as done
    while idle_rounds < 50:
        QCoreApplication.processEvents()
        time.sleep(0.002)
        busy = dock.runner.busy or QgsApplication.taskManager().countActiveTasks()
        idle_rounds = 0 if busy else idle_rounds + 1
        assert time.monotonic() < deadline, "the run did not finish"
    timer.stop()
    print("longest main-thread gaps (ms):", sorted(gaps)[-5:])
    return max(gaps[1:] or [0])


def open_dock(iface, raster: Path, cache: Path, model: str, max_new_tokens: int) -> GeoChatDock:
    """The dock on ``raster`` (added and active) in an EPSG:4326 project, the runtime's model
    cache, llama.cpp as the dock's backend, the family's tile size, no "start it?" question,
    ``model`` picked in the model list."""
    QgsProject.instance().setCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    layer = QgsRasterLayer(str(raster), "cogeo")
    QgsProject.instance().addMapLayer(layer)
    iface.setActiveLayer(layer)
    widget = GeoChatDock(iface)
    widget.settings.cache_dir = str(cache)
    widget.settings.backend = "llama.cpp"
    widget.settings.tile_size = 0  # the family's own (GeoChat: 504 px, GeoPixel: 1680 px)
    widget.settings.max_new_tokens = max_new_tokens
    widget.settings.ask_above_seconds = 1e9
    index = widget.model_combo.findData(model)
    assert index >= 0, f"the dock lists no {model}"
    widget.model_combo.setCurrentIndex(index)
    return widget
