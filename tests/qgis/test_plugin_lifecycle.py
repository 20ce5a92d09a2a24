"""The plugin loaded from its installed zip the way QGIS loads it (qgis.utils), offscreen."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import qgis.utils
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis_runtime import FORBIDDEN, run_until_done, runtime_python

NAME = "geochat_qgis"


def _forget_package() -> None:
    for module in [m for m in sys.modules if m == NAME or m.startswith(NAME + ".")]:
        del sys.modules[module]


@pytest.fixture()
def installed_plugin_path(qgis_profile, qgis_iface):
    """Make QGIS see the installed copy (not the source checkout) as it sees profile plugins."""
    qgis_dir, profile = qgis_profile
    plugins_dir = str(qgis_dir / "profiles" / profile / "python" / "plugins")
    _forget_package()
    sys.path.insert(0, plugins_dir)
    qgis.utils.plugin_paths.insert(0, plugins_dir)
    qgis.utils.updateAvailablePlugins()  # QGIS reads every metadata.txt on its plugin paths
    assert NAME in qgis.utils.available_plugins
    assert qgis.utils.pluginMetadata(NAME, "name") == "GeoChat"
    yield plugins_dir
    if NAME in qgis.utils.active_plugins:
        qgis.utils.unloadPlugin(NAME)
    sys.path.remove(plugins_dir)
    qgis.utils.plugin_paths.remove(plugins_dir)
    _forget_package()


def _start(plugins_dir: str):
    assert qgis.utils.loadPlugin(NAME)
    assert sys.modules[NAME].__file__.startswith(plugins_dir)
    assert qgis.utils.startPlugin(NAME)
    return qgis.utils.plugins[NAME]


def _log_messages():
    received: list[tuple[str, str]] = []
    QgsApplication.messageLog().messageReceived.connect(lambda msg, tag, _lvl: received.append((tag, msg)))
    return received


def test_load_start_unload_and_load_again(installed_plugin_path, qgis_iface, demo_raster, data_dir):
    log = _log_messages()
    plugin = _start(installed_plugin_path)
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("geochat") is not None
    assert ("GeoChat", "geochat_qgis.plugin: GeoChat loaded") in log
    assert plugin.action is not None and plugin.dock is None

    # the toolbar/menu action toggles the dock
    plugin.action.trigger()
    dock = plugin.dock
    assert dock is not None and plugin.action.isChecked()

    raster = QgsRasterLayer(str(demo_raster), "cogeo")
    vector = QgsVectorLayer("Point?crs=EPSG:4326", "points", "memory")
    QgsProject.instance().addMapLayers([raster, vector])
    dock.set_layer(raster)
    assert dock.layer is raster
    assert dock.layer_summary().startswith("cogeo | EPSG:3857 | 1024 x 1024 px")
    dock.set_layer(vector)
    assert dock.layer is None and "'points' is not a raster layer" in dock.layer_summary()
    dock.set_layer(None)
    assert "No layer selected" in dock.layer_summary()

    assert qgis.utils.unloadPlugin(NAME)
    assert plugin.dock is None and plugin.action is None and plugin.provider is None
    assert registry.providerById("geochat") is None
    assert NAME not in sys.modules
    # nothing of ours is left listening to the interface
    assert qgis_iface.receivers(qgis_iface.currentLayerChanged) == 0

    # load again, as Plugin Reloader does
    plugin = _start(installed_plugin_path)
    assert registry.providerById("geochat") is not None
    plugin.show_dock()
    assert plugin.dock is not None and plugin.action.isChecked()
    assert qgis.utils.unloadPlugin(NAME)
    QgsProject.instance().removeAllMapLayers()


def test_dock_starts_on_the_active_layer(installed_plugin_path, qgis_iface, demo_raster):
    raster = QgsRasterLayer(str(demo_raster), "cogeo")
    QgsProject.instance().addMapLayer(raster)
    qgis_iface.setActiveLayer(raster)
    plugin = _start(installed_plugin_path)
    plugin.show_dock()
    assert plugin.dock.layer is raster
    assert qgis.utils.unloadPlugin(NAME)
    QgsProject.instance().removeAllMapLayers()


FRESH = "GEOCHAT_TEST_FRESH_PROCESS"


def test_a_dock_run_and_a_question_leave_qgis_holding_only_qgis(request, tmp_path):
    """The installed plugin in a fresh QGIS process: a find-objects run with the demo model
    through the dock adds a layer with features, a question gets an answer, unloading stops
    the runtime child, and no core package (numpy, shapely, ...) was ever imported here."""
    runtime_python()  # skips without a runtime
    if not os.environ.get(FRESH):  # modules other tests imported must not count: a fresh Python
        done = subprocess.run(
            [sys.executable, "-m", "pytest", f"{__file__}::{request.node.name}", "-q",
             "-p", "no:cacheprovider"], cwd=str(Path(__file__).resolve().parents[2]),
            env={**os.environ, FRESH: "1"}, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        assert done.stdout.strip().splitlines()[-1].startswith("1 passed"), done.stdout[-3000:]
        return
    request.getfixturevalue("runtime_cache")
    plugins_dir = request.getfixturevalue("installed_plugin_path")
    demo_raster = request.getfixturevalue("demo_raster")
    # QGIS's own Python may hold some already (QGIS 3.40 imports numpy): the plugin adds none
    qgis_own = {m for m in FORBIDDEN if m in sys.modules}
    assert qgis_own <= {"numpy"}, qgis_own
    plugin = _start(plugins_dir)
    plugin.show_dock()
    dock = plugin.dock
    QgsProject.instance().setCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    raster = QgsRasterLayer(str(demo_raster), "cogeo")
    QgsProject.instance().addMapLayer(raster)
    dock.set_layer(raster)
    dock.settings.backend, dock.settings.max_new_tokens = "llama.cpp", 24
    dock.settings.ask_above_seconds, dock.settings.tile_size = 1e9, 0
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("tiny-demo"))
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("refer"))
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
    dock.prompt_edit.setText("car")
    dock.send()
    run_until_done(dock, timeout=300)
    answer = dock.chat.messages[-1]
    assert answer["role"] == "assistant" and answer["text"].startswith("Found"), dock.chat.messages
    layer = QgsProject.instance().mapLayer(answer["layer_id"])
    assert isinstance(layer, QgsVectorLayer) and layer.featureCount() >= 1
    assert layer.crs().authid() == "EPSG:4326" and layer.renderer().type() == "categorizedSymbol"

    dock.task_combo.setCurrentIndex(dock.task_combo.findData("chat"))
    dock.prompt_edit.setText("What is in this image?")
    dock.send()
    run_until_done(dock, timeout=300)
    roles = [m["role"] for m in dock.chat.messages]
    assert roles[-3:] == ["user", "assistant", "info"], dock.chat.messages
    assert dock.chat.messages[-2]["user_text"] == "What is in this image?"

    pid = sys.modules[f"{NAME}.client"].shared_client().pid
    assert pid is not None  # the model ran in the runtime child
    assert qgis.utils.unloadPlugin(NAME)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the runtime child outlived the plugin"
    QgsProject.instance().removeAllMapLayers()
    assert [m for m in FORBIDDEN if m in sys.modules and m not in qgis_own] == []


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our zombie
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
