"""The demo `build.py run` performs in real QGIS: load the raster, open the dock, find objects.

It drives the dock the way an analyst does (task, area, prompt, Send) and saves what a person
would look at: the dock empty, streaming and with results, the main window, and the result layer.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qgis.core import QgsProject, QgsRasterLayer
from qgis.gui import QgisInterface
from qgis.PyQt.QtCore import QCoreApplication

from . import area as areas
from .model_choice import DEMO_NAME, DEMO_NOTE

DEMO_PROMPT = "building; road"


def say(text: str) -> None:
    print(f"GEOCHAT-RUN: {text}", flush=True)


def start_demo(iface: QgisInterface, plugin, raster: Path, out: Path) -> Callable[[], bool]:
    """Start the run; returns ``step()``, True once everything is saved (poll it from a timer)."""
    out.mkdir(parents=True, exist_ok=True)
    layer = QgsRasterLayer(str(raster), raster.stem)
    if not layer.isValid():
        raise RuntimeError(f"the demo raster did not load: {raster}")
    QgsProject.instance().addMapLayer(layer)
    # QGIS takes a new project's CRS from its first layer in a deferred step: let it happen,
    # as it has when a user types the prompt (results go in the project CRS)
    for _ in range(50):
        QCoreApplication.processEvents()
        if QgsProject.instance().crs() == layer.crs():
            break
        time.sleep(0.01)
    iface.setActiveLayer(layer)
    iface.mapCanvas().setExtent(layer.extent())
    plugin.show_dock()
    dock = plugin.dock
    say(f"raster loaded: {layer.name()} {layer.crs().authid()}")
    say(f"dock shows: {dock.layer_summary()}")
    dock.grab().save(str(out / "dock_empty.png"))
    if (dock.model_combo.currentData() or "") == DEMO_NAME:
        say(f"model: the {DEMO_NOTE}")
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("refer"))
    dock.area_combo.setCurrentIndex(dock.area_combo.findData(areas.LAYER))
    dock.prompt_edit.setText(DEMO_PROMPT)
    dock.settings.ask_above_seconds = float("inf")  # nobody is there to answer "start it?"
    streaming = {"saved": False}
    original_wire = dock._wire

    def wire(run, *args) -> None:
        original_wire(run, *args)

        def first_tokens(_piece: str) -> None:
            if not streaming["saved"]:
                streaming["saved"] = True
                dock.grab().save(str(out / "dock_streaming.png"))

        run.tokenReceived.connect(first_tokens)

    dock._wire = wire
    dock.send()
    say(f"asked: find objects [refer] '{DEMO_PROMPT}' over the whole layer")
    started = {"sent": True}

    def step() -> bool:
        if not started["sent"] or dock.runner.busy or not dock.chat.messages:
            return False
        last = dock.chat.messages[-1]
        if last["role"] not in ("assistant", "error"):
            return False
        say(f"answer: {last['text']}")
        if last.get("layer_id"):
            result = QgsProject.instance().mapLayer(last["layer_id"])
            say(f"result layer: '{result.name()}', {result.featureCount()} feature(s), "
                f"{result.crs().authid()}")
            written = dock.results_bar.export_current(path=out / "demo_detections.gpkg")
            say(f"result layer written to {written}")
        iface.mapCanvas().refreshAllLayers()
        iface.mapCanvas().waitWhileRendering()
        dock.grab().save(str(out / "dock_results.png"))
        iface.mainWindow().grab().save(str(out / "qgis_main_window.png"))
        say(f"screenshots saved in {out}")
        return True

    return step
