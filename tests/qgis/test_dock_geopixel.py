"""The dock with the tiny GeoPixel demo, in real QGIS offscreen: a new user picks "Tiny GeoPixel
demo" (random weights, built on first use by the runtime child with the project's own maker; no
download) and its masks become polygons in the project CRS, linked to the phrase they answer.
The geopixel backend (torch) runs in the runtime child (GEOCHAT_RUNTIME_PYTHON); QGIS's process
holds only QGIS."""
from __future__ import annotations

import sys

import pytest
from qgis.core import (
    QgsCoordinateTransform,
    QgsProject,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QUrl

from geochat_qgis.gui import area as areas
from geochat_qgis.gui.chat_view import phrase_href
from geochat_qgis.gui.result_layers import GROUP_NAME
from qgis_runtime import FORBIDDEN, open_dock, run_until_done

DEMO = "tiny-geopixel-demo"
_BEFORE = {name for name in FORBIDDEN if name in sys.modules}


@pytest.fixture()
def dock(qgis_iface, qgis_new_project, demo_raster, runtime_cache):
    widget = open_dock(qgis_iface, demo_raster, runtime_cache[0], DEMO, 16)
    widget.settings.device = "cpu"  # the dock's backend stays llama.cpp: GeoPixel overrides it
    widget.task_combo.setCurrentIndex(widget.task_combo.findData("refer"))
    widget._on_model_chosen(widget.model_combo.currentIndex())  # as the user's pick does
    yield widget
    widget.cleanup()
    widget.deleteLater()
    QgsProject.instance().removeAllMapLayers()
    leaked = [n for n in FORBIDDEN if n in sys.modules and n not in _BEFORE]
    assert not leaked, f"core packages were imported into QGIS's process: {leaked}"


def test_picking_the_geopixel_demo_sets_the_backend_and_the_task(dock):
    assert dock.model_combo.itemText(dock.model_combo.currentIndex()).startswith("Tiny GeoPixel")
    assert dock.task_name == "segment"  # "refer" has no GeoPixel prompt
    assert not dock.backend_combo.isEnabled()  # the geopixel backend runs it, whatever it says
    model = dock.build_request(None, check=False)["model"]
    assert model == {"backend": "geopixel", "name": DEMO, "device": "cpu",
                     "cache_dir": dock.settings.cache_dir}


def test_masks_become_polygons_in_the_project_crs_linked_to_their_phrase(dock):
    dock.area_combo.setCurrentIndex(dock.area_combo.findData(areas.LAYER))
    dock.prompt_edit.setText("building")
    dock.send()
    run_until_done(dock, timeout=900)
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP_NAME)
    assert group is not None and len(group.findLayers()) == 1, dock.chat.messages
    layer = group.findLayers()[0].layer()
    assert layer.crs().authid() == "EPSG:4326"  # the project's, not the raster's EPSG:3857
    assert QgsWkbTypes.geometryType(layer.wkbType()) == QgsWkbTypes.PolygonGeometry
    assert layer.featureCount() >= 1, dock.chat.messages  # the demo answers <p> a </p> [SEG]
    features = list(layer.getFeatures())
    assert {f["kind"] for f in features} == {"mask"} and {f["task"] for f in features} == {"segment"}
    to_4326 = QgsCoordinateTransform(dock.layer.crs(), layer.crs(), QgsProject.instance())
    raster_4326 = to_4326.transformBoundingBox(dock.layer.extent())
    raster_4326.grow(1e-9)
    assert raster_4326.contains(layer.extent())  # the masks lie on the raster
    answer = dock.chat.messages[-1]
    assert answer["role"] == "assistant" and answer["layer_id"] == layer.id()
    label = features[0]["label"]
    assert answer["counts"][label] == sum(f["label"] == label for f in features)
    assert "geochat:" in dock.chat.toHtml()  # the phrase is a link
    dock.chat.anchorClicked.emit(QUrl(phrase_href(layer.id(), label)))
    assert {f["label"] for f in layer.getSelectedFeatures()} == {label}
