"""Once in the real QGIS desktop application on a virtual display, started as `run` starts it."""
from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [
    pytest.mark.xvfb,
    pytest.mark.skipif(not shutil.which("xvfb-run") or not shutil.which("qgis"),
                       reason="needs Debian's qgis and xvfb (python3 build.py setup installs them)"),
]

BODY = """
    def main(iface):
        import json
        import qgis.utils
        from qgis.core import QgsRasterLayer, QgsVectorLayer
        from qgis.PyQt.QtCore import QCoreApplication, QEvent
        from qgis.PyQt.QtWidgets import QDockWidget

        report = {{"active_plugins": list(qgis.utils.active_plugins)}}
        plugin = qgis.utils.plugins["geochat_qgis"]
        window = iface.mainWindow()
        report["toolbar_action"] = plugin.action.objectName()
        raster = QgsRasterLayer({raster!r}, "cogeo")
        vector = QgsVectorLayer("Point?crs=EPSG:4326", "points", "memory")
        QgsProject.instance().addMapLayers([raster, vector])
        plugin.action.trigger()  # the toolbar button opens the dock
        iface.setActiveLayer(raster)  # the real layer tree emits currentLayerChanged
        report["on_raster"] = plugin.dock.layer_summary()
        iface.setActiveLayer(vector)
        report["on_vector"] = plugin.dock.layer_summary()
        iface.setActiveLayer(raster)
        window.grab().save({screenshot!r})
        report["unloaded"] = qgis.utils.unloadPlugin("geochat_qgis")
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        report["docks_after_unload"] = len([d for d in window.findChildren(QDockWidget, "GeoChatDock")])
        report["reloaded"] = qgis.utils.loadPlugin("geochat_qgis") and qgis.utils.startPlugin("geochat_qgis")
        qgis.utils.plugins["geochat_qgis"].show_dock()
        report["after_reload"] = qgis.utils.plugins["geochat_qgis"].dock.layer_summary()
        with open({report_path!r}, "w") as handle:
            json.dump(report, handle)
"""


def test_real_qgis_desktop_runs_the_plugin(build_module, qgis_profile, demo_raster, tmp_path):
    qgis_dir, profile = qgis_profile
    report_path = tmp_path / "report.json"
    screenshot = tmp_path / "main_window.png"
    body = BODY.format(raster=str(demo_raster), screenshot=str(screenshot), report_path=str(report_path))
    result = build_module.run_qgis(qgis_dir, profile, build_module.startup_script(body, True), True, timeout=240)
    assert "GEOCHAT-RUN-ERROR" not in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert "geochat_qgis" in report["active_plugins"]
    assert report["toolbar_action"] == "GeoChatToggleDock"
    assert report["on_raster"].startswith("cogeo | EPSG:3857 | 1024 x 1024 px")
    assert "'points' is not a raster layer" in report["on_vector"]
    assert report["unloaded"] is True and report["docks_after_unload"] == 0
    assert report["reloaded"] is True
    assert report["after_reload"].startswith("cogeo | EPSG:3857")
    assert screenshot.stat().st_size > 10_000  # a real rendered window, not an empty image
