"""The plugin loaded from its installed zip the way QGIS loads it (qgis.utils), offscreen."""
from __future__ import annotations

import sys

import pytest
import qgis.utils
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer

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
