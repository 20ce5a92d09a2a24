"""``detect`` and ``ask`` from the command line, with the tiny GeoChat GGUF on a real raster."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
import rasterio
from pyproj import CRS
from shapely.geometry import box

from geochat_qgis.cli import main

pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parents[2]


def detect_args(raster, model, out, *extra: str) -> list[str]:
    return ["detect", str(raster), "--model", str(model), "--task", "refer", "--prompt", "car",
            "--max-new-tokens", "40", "-o", str(out), *extra]


def test_detect_writes_a_valid_shapefile_in_the_raster_crs(tiny_gguf, demo_raster, tmp_path):
    out = tmp_path / "cars.shp"
    run = subprocess.run(
        [sys.executable, "-m", "geochat_qgis", *detect_args(demo_raster, tiny_gguf, out,
                                                              "--grammar", "--overlap", "0.1")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "tiles: 9 done, 0 skipped (nodata), 0 failed of 9; detections:" in run.stdout
    for suffix in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
        assert out.with_suffix(suffix).is_file()
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind
    frame = pyogrio.read_dataframe(out)
    with rasterio.open(demo_raster) as ds:
        raster_crs, footprint = CRS(ds.crs), box(*ds.bounds)
    assert len(frame) > 0
    assert CRS(frame.crs) == raster_crs
    assert frame.geometry.is_valid.all()
    assert frame.geometry.within(footprint.buffer(1e-6)).all()
    assert set(frame["label"]) == {"car"} and set(frame["task"]) == {"refer"}
    assert frame["model"].str.startswith("llama.cpp").all()
    detections = int(run.stdout.split("detections: ")[1].split(";")[0])
    assert detections == len(frame)


def test_detect_geojson_in_another_crs(tiny_gguf, demo_raster, tmp_path, capsys):
    out = tmp_path / "cars.geojson"
    code = main(detect_args(demo_raster, tiny_gguf, out, "--grammar", "--quiet",
                            "--extent", "128.6560,37.6670,128.6580,37.6685", "--extent-crs",
                            "EPSG:4326", "--output-crs", "EPSG:4326"))
    assert code == 0, capsys.readouterr().err
    frame = pyogrio.read_dataframe(out)
    assert CRS(frame.crs) == CRS("EPSG:4326") and len(frame) > 0
    lon_min, lat_min, lon_max, lat_max = frame.total_bounds
    assert 128.655 < lon_min < lon_max < 128.661 and 37.666 < lat_min < lat_max < 37.671


def test_ask_answers_about_an_overview(tiny_gguf, demo_raster, capsys):
    code = main(["ask", str(demo_raster), "--model", str(tiny_gguf), "--prompt",
                 "What is in this image?", "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip()
    assert "overview of the extent (1024 x 1024 px) downsampled to one 504 px tile" in captured.err


def test_ask_small_extent_is_one_native_tile(tiny_gguf, demo_raster, capsys):
    with rasterio.open(demo_raster) as ds:
        left, bottom = ds.bounds.left, ds.bounds.bottom
    code = main(["ask", str(demo_raster), "--model", str(tiny_gguf), "--prompt", "Count cars.",
                 "--extent", f"{left},{bottom},{left + 200},{bottom + 200}",
                 "--max-new-tokens", "4"])
    assert code == 0
    assert "one 504 px tile at 0.472 m per pixel"  # ground metres at 37.7 N in capsys.readouterr().err


# -- bad input: a clear message, a non-zero exit, no output file -------------------------------

def _fails(args: list[str], capsys, pattern: str, out: Path) -> None:
    assert main(args) == 1
    assert pattern in capsys.readouterr().err
    assert not out.exists()


def test_wrong_model_file_type(demo_raster, tmp_path, capsys):
    out = tmp_path / "o.gpkg"
    _fails(detect_args(demo_raster, demo_raster, out, "--backend", "llama.cpp"), capsys,
           "is not a GGUF file", out)


def test_missing_mmproj(tiny_gguf, demo_raster, tmp_path, capsys):
    shutil.copy(tiny_gguf / "model.gguf", tmp_path / "model.gguf")
    out = tmp_path / "o.gpkg"
    _fails(detect_args(demo_raster, tmp_path / "model.gguf", out), capsys,
           "No mmproj (vision projector) GGUF found", out)


def test_mismatched_mmproj(tiny_gguf, demo_raster, tmp_path, capsys):
    from test_backend_llama_cpp import write_foreign_mmproj

    other = write_foreign_mmproj(tmp_path / "mmproj-7b.gguf")
    out = tmp_path / "o.gpkg"
    _fails(detect_args(demo_raster, tiny_gguf / "model.gguf", out, "--mmproj", str(other)),
           capsys, "does not belong to model.gguf", out)


def test_mmproj_of_the_wrong_type(tiny_gguf, demo_raster, tmp_path, capsys):
    out = tmp_path / "o.gpkg"
    _fails(detect_args(demo_raster, tiny_gguf / "model.gguf", out, "--mmproj",
                       str(demo_raster)), capsys, "is not a GGUF file", out)


def test_truncated_gguf(tiny_gguf, demo_raster, tmp_path, capsys):
    data = (tiny_gguf / "model.gguf").read_bytes()
    (tmp_path / "model.gguf").write_bytes(data[: len(data) // 3])
    shutil.copy(tiny_gguf / "mmproj.gguf", tmp_path / "mmproj.gguf")
    out = tmp_path / "o.gpkg"
    _fails(detect_args(demo_raster, tmp_path, out), capsys, "truncated", out)


def test_server_down(demo_raster, tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "o.gpkg"
    _fails(detect_args(demo_raster, "geochat-7b", out, "--server-url",
                       f"http://127.0.0.1:{port}/v1", "--timeout", "5"),
           capsys, "connection refused. Is the server running?", out)


def test_missing_raster_and_missing_prompt(tiny_gguf, tmp_path, capsys, demo_raster):
    out = tmp_path / "o.gpkg"
    _fails(detect_args(tmp_path / "nope.tif", tiny_gguf, out), capsys, "nope.tif", out)
    args = detect_args(demo_raster, tiny_gguf, out)
    args.remove("--prompt")
    args.remove("car")
    _fails(args, capsys, "--prompt TEXT", out)


def test_all_nodata_is_said_and_writes_an_empty_layer(tiny_gguf, data_dir, tmp_path, capsys):
    out = tmp_path / "none.gpkg"
    assert main(detect_args(data_dir / "all-nodata.tif", tiny_gguf, out)) == 0
    captured = capsys.readouterr()
    assert "0 done, 6 skipped (nodata)" in captured.out
    assert "every tile of the area is nodata" in captured.err
    assert len(pyogrio.read_dataframe(out)) == 0
