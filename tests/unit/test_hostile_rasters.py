"""Rasters the tiler cannot stretch (complex SAR values) are refused up front, by name, on the
command line (tiles, detect) and through the runtime child (what Processing and the dock use)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio
from affine import Affine
from vrt_files import write_vrt

from geochat_qgis.client import RuntimeClient, RuntimeClientError
from geochat_qgis.core.errors import RasterError
from geochat_qgis.core.raster import RasterReader

ROOT = Path(__file__).resolve().parents[2]


def complex_raster(folder: Path, dtype: str) -> Path:
    """A 64x64 georeferenced GeoTIFF (or, for CInt32, a VRT over a CInt16 one) of SAR-like
    complex values."""
    if dtype == "CInt32":
        source = complex_raster(folder, "complex_int16")
        return write_vrt(folder / "cint32.vrt", source, 64, 64, "CInt32")
    path = folder / f"{dtype}.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=2, dtype=dtype,
                       crs="EPSG:32633", transform=Affine(1, 0, 500000, 0, -1, 5000000)) as ds:
        if dtype != "complex_int16":  # numpy has no complex int: GDAL's zeros stay
            rng = np.random.default_rng(0)
            values = rng.normal(size=(2, 64, 64)) + 1j * rng.normal(size=(2, 64, 64))
            ds.write(values.astype(dtype))
    return path


TYPES = ["complex64", "complex128", "complex_int16", "CInt32"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geochat_qgis", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_refused(message: str, band: int = 1) -> None:
    assert f"band {band} holds complex values" in message, message
    assert "amplitude band" in message and "abs(" in message
    assert "internal error" not in message and "Traceback" not in message


@pytest.mark.parametrize("dtype", TYPES)
def test_tiles_refuses_complex_values_naming_the_type(tmp_path, dtype):
    raster = complex_raster(tmp_path, dtype)
    run = cli("tiles", str(raster), "--out", str(tmp_path / "tiles"), "--tile-size", "32")
    assert run.returncode == 1
    assert_refused(run.stderr)
    assert "complex" in run.stderr.split("holds complex values (")[1].split(",")[0]
    assert not list((tmp_path / "tiles").glob("*.png")) if (tmp_path / "tiles").exists() else True


def test_the_reader_refuses_a_complex_band_among_the_chosen_ones(tmp_path):
    raster = complex_raster(tmp_path, "complex64")
    with pytest.raises(RasterError, match="band 2 holds complex values"):
        RasterReader(raster, bands=[2])


@pytest.mark.slow
def test_detect_refuses_complex_values_before_loading_the_model(tmp_path, tiny_gguf):
    raster = complex_raster(tmp_path, "complex_int16")
    out = tmp_path / "cars.gpkg"
    run = cli("detect", str(raster), "--model", str(tiny_gguf), "--prompt", "car",
              "--max-new-tokens", "8", "-o", str(out))
    assert run.returncode == 1
    assert_refused(run.stderr)
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow
def test_a_run_through_the_runtime_child_is_refused_with_the_raster_error(tmp_path, monkeypatch,
                                                                         tiny_gguf):
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    raster = complex_raster(tmp_path, "complex64")
    client = RuntimeClient(python=sys.executable, heartbeat_interval=0.2, heartbeat_timeout=20)
    try:
        request = {"raster": str(raster), "task": "refer", "prompts": ["car"],
                   "model": {"model_path": str(tiny_gguf), "n_threads": 1},
                   "tiling": {"tile_size": 32, "overlap": 0},
                   "output": {"path": str(tmp_path / "out.gpkg")}}
        with pytest.raises(RuntimeClientError) as refused:
            client.run(request)
        assert refused.value.kind == "RasterError"  # refused when planned: no model loaded
        assert_refused(refused.value.message)
        with pytest.raises(RuntimeClientError, match="holds complex values"):
            client.plan(request)  # the dock's preview says it too
        assert not (tmp_path / "out.gpkg").exists()
        assert client.ping() > 0  # the child is unharmed
    finally:
        client.close()
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.status() == psutil.STATUS_ZOMBIE]
