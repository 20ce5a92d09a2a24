"""``detect --task segment`` with the tiny GeoPixel demo (random weights in the published
checkpoint's layout, built on first use by the project's own maker): its masks become polygons
in a Shapefile, a GeoPackage and a GeoJSON, georeferenced, with the phrase they answer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
import rasterio
from pyproj import CRS
from rasterio.warp import transform_bounds
from shapely.geometry import box

from geochat_qgis.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = "tiny-geopixel-demo"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("geopixel-cache")


def segment_args(raster: Path, out: Path, *extra: str) -> list[str]:
    return ["detect", str(raster), "--model", DEMO, "--task", "segment", "--prompt", "building",
            "--max-new-tokens", "16", "-o", str(out), "--quiet", *extra]


def check_masks(out: Path, raster: Path, crs: CRS) -> None:
    frame = pyogrio.read_dataframe(out)
    assert len(frame) > 0, "the demo answers with [SEG]: at least one mask"
    assert set(frame.geometry.geom_type) <= {"Polygon", "MultiPolygon"}
    assert CRS.from_user_input(frame.crs) == crs
    assert set(frame["kind"]) == {"mask"} and set(frame["task"]) == {"segment"}
    assert all(isinstance(p, str) for p in frame["label"])
    with rasterio.open(raster) as src:  # masks lie on the raster, not in tile pixels
        bounds = box(*transform_bounds(src.crs, crs.to_wkt(), *src.bounds))
    margin = 1e-6 if crs.is_geographic else 1.0
    assert all(bounds.buffer(margin).contains(g) for g in frame.geometry)


def test_segment_from_the_command_line_writes_a_shapefile_of_masks(cache, demo_raster, tmp_path):
    out = tmp_path / "buildings.shp"
    env = {**os.environ, "GEOCHAT_CACHE": str(cache)}
    run = subprocess.run([sys.executable, "-m", "geochat_qgis", *segment_args(demo_raster, out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for suffix in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
        assert out.with_suffix(suffix).is_file()
    assert not list(tmp_path.glob(".*partial*"))
    with rasterio.open(demo_raster) as src:
        crs = CRS(src.crs)
    check_masks(out, demo_raster, crs)
    assert (cache / DEMO / "config.json").is_file()  # built once, in the model cache


@pytest.mark.parametrize("suffix, output_crs", [(".gpkg", None), (".geojson", "EPSG:4326")])
def test_segment_writes_geopackage_and_geojson(cache, demo_raster, tmp_path, monkeypatch,
                                               suffix, output_crs):
    monkeypatch.setenv("GEOCHAT_CACHE", str(cache))
    out = tmp_path / f"masks{suffix}"
    extra = ("--output-crs", output_crs) if output_crs else ()
    assert main(segment_args(demo_raster, out, *extra)) == 0
    with rasterio.open(demo_raster) as src:
        crs = CRS(output_crs) if output_crs else CRS(src.crs)
    check_masks(out, demo_raster, crs)


def test_a_folder_without_geopixel_weights_is_named(demo_raster, tmp_path, capsys):
    empty = tmp_path / "weights"
    empty.mkdir()
    out = tmp_path / "o.gpkg"
    assert main(["detect", str(demo_raster), "--model", str(empty), "--backend", "geopixel",
                 "--task", "segment", "--prompt", "building", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "weights" in err and "Traceback" not in err, err
    assert not out.exists()
