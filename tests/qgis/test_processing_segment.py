"""``geochat:segment`` in real QGIS (offscreen) with the tiny GeoPixel demo in the runtime child
(random weights in the published layout, built on first use by the project's own maker; the
geopixel backend on the CPU): masks become polygons in the raster's CRS, the same as the
command line writes for the same choices."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import QgsProcessingException, QgsVectorLayer  # noqa: E402

from processing_helpers import ROOT, corner, features_of, forbidden_modules  # noqa: E402
from processing_helpers import provider, runtime  # noqa: E402, F401 (fixtures)

DEMO = "tiny-geopixel-demo"


def segment_parameters(raster: Path, output: str, **changes) -> dict:
    return {"INPUT": str(raster), "PROMPT": "building", "TASK": "segment", "MODEL": DEMO,
            "MAX_NEW_TOKENS": 16, "DEVICE": "cpu", "OUTPUT": output, **changes}


def cli_segment(raster: Path, output: Path, cache: str) -> None:
    """The same choices through the command line, in the runtime's interpreter."""
    python = shlex.split(os.environ["GEOCHAT_RUNTIME_PYTHON"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GEOCHAT_CACHE": cache}
    done = subprocess.run(
        [*python, "-m", "geochat_qgis", "detect", str(raster), "--model", DEMO, "--task",
         "segment", "--prompt", "building", "--max-new-tokens", "16", "--device", "cpu",
         "-o", str(output), "--quiet"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]


def test_segment_writes_mask_polygons_as_the_command_line_does(provider, demo_raster, runtime,
                                                                tmp_path):
    import processing

    output = tmp_path / "masks.gpkg"
    results = processing.run("geochat:segment", segment_parameters(demo_raster, str(output)))
    layer = QgsVectorLayer(str(output), "masks", "ogr")
    assert layer.isValid() and layer.crs().authid() == "EPSG:3857"  # the raster's CRS
    assert results["TILES_DONE"] == 1  # the 1024 px demo raster is one GeoPixel tile
    assert results["DETECTIONS"] == layer.featureCount() > 0
    xmin, ymin, xmax, ymax = corner(demo_raster, 1024, 1024)
    for feature in layer.getFeatures():
        assert feature["kind"] == "mask" and feature["task"] == "segment"
        assert feature["model"].startswith("geopixel")
        box = feature.geometry().boundingBox()
        assert xmin - 1 <= box.xMinimum() and box.xMaximum() <= xmax + 1
        assert ymin - 1 <= box.yMinimum() and box.yMaximum() <= ymax + 1
    expected = tmp_path / "cli.gpkg"
    cli_segment(demo_raster, expected, runtime)
    assert features_of(output) == features_of(expected)
    assert not forbidden_modules()  # torch stayed in the runtime child


def test_a_folder_without_geopixel_weights_is_a_clear_error(provider, demo_raster, tmp_path):
    import processing

    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(QgsProcessingException, match="weights"):
        processing.run("geochat:segment", segment_parameters(
            demo_raster, str(tmp_path / "masks.gpkg"), MODEL=str(empty)))
    assert not (tmp_path / "masks.gpkg").exists()
