"""Huge requests are refused when tiles are planned, before any pixel is read, with the
numbers and what to do: the memory one tile needs against the machine's, and the tile count.
Real processes: the command line and the runtime child (what Processing and the dock use)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from vrt_files import write_vrt

from geochat_qgis.client import RuntimeClient, RuntimeClientError
from geochat_qgis.core.errors import RasterError
from geochat_qgis.core.limits import MAX_TILES, check_tile_memory, tile_memory_bytes

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geochat_qgis", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_clear(run: subprocess.CompletedProcess, *phrases: str) -> None:
    assert run.returncode == 1, run.stdout + run.stderr
    for phrase in phrases:
        assert phrase in run.stderr, run.stderr
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr


@pytest.fixture
def big_vrt(tmp_path, demo_raster) -> Path:
    """A 2e9 px (50000 x 40000) 16-bit VRT over the demo raster: nothing is read to plan it."""
    return write_vrt(tmp_path / "big.vrt", demo_raster, 50000, 40000, "UInt16")


def test_one_tile_memory_is_estimated_from_size_bands_and_type():
    small = tile_memory_bytes(504, 3, np.dtype("uint8"))
    assert 5e6 < small < 5e7  # a usual tile: tens of MB at most
    assert tile_memory_bytes(60000, 3, np.dtype("uint8")) > 1e11
    assert tile_memory_bytes(504, 3, np.dtype("float64")) > small
    check_tile_memory(504, 3, np.dtype("uint8"), available=2 * 10**9)
    with pytest.raises(RasterError, match=r"5,000 x 5,000 px \(4 band\(s\) of uint16\) needs "
                                          r"about .* GB .* has 1\.0 GB available"):
        check_tile_memory(5000, 4, np.dtype("uint16"), available=10**9)


@pytest.mark.parametrize("size", ["60000", "100000"])
def test_tiles_refuses_a_tile_larger_than_memory(tmp_path, demo_raster, size):
    started = time.monotonic()
    run = cli("tiles", str(demo_raster), "--out", str(tmp_path / "t"), "--tile-size", size)
    assert_clear(run, f"A tile of {int(size):,} x {int(size):,} px", "GB of memory",
                 "available", "smaller tile size")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "t" / "tiles.gpkg").exists()


def test_a_2e9_pixel_vrt_is_planned_without_reading_and_refused_by_its_numbers(tmp_path,
                                                                              big_vrt):
    run = cli("tiles", str(big_vrt), "--out", str(tmp_path / "a"), "--tile-size", "100000")
    assert_clear(run, "A tile of 100,000 x 100,000 px (1 band(s) of uint16)")
    run = cli("tiles", str(big_vrt), "--out", str(tmp_path / "b"), "--tile-size", "16",
              "--overlap", "0")
    assert_clear(run, "This plan has 7,812,500 tiles (3,125 x 2,500)", f"{MAX_TILES:,}",
                 "smaller area")


@pytest.mark.parametrize("args, phrases", [
    (["--gsd", "0.0005"], ["This plan has 1,048,576 tiles", "days", "coarser GSD"]),
    (["--overlap", "0.999"], ["This plan has 271,441 tiles", "overlap leaves only 1 native px",
                              "well below 1"]),
])
def test_tiles_refuses_a_plan_of_too_many_tiles_at_once(tmp_path, demo_raster, args, phrases):
    started = time.monotonic()
    run = cli("tiles", str(demo_raster), "--out", str(tmp_path / "t"), *args, timeout=60)
    assert_clear(run, *phrases)
    assert time.monotonic() - started < 30  # before the grid is built


@pytest.mark.slow
def test_detect_refuses_a_huge_tile_before_loading_the_model(tmp_path, demo_raster, tiny_gguf):
    out = tmp_path / "cars.gpkg"
    run = cli("detect", str(demo_raster), "--model", str(tiny_gguf), "--prompt", "car",
              "--tile-size", "60000", "-o", str(out))
    assert_clear(run, "A tile of 60,000 x 60,000 px", "smaller tile size")
    assert not out.exists()


@pytest.mark.slow
def test_the_runtime_child_refuses_before_growing(tmp_path, monkeypatch, demo_raster,
                                                  tiny_gguf):
    """What Processing's TILE_SIZE=60000 did: the child grew to 23.7 GB. Now it is refused
    with the numbers, the child stays small and keeps serving; a preview of a million tiles
    is refused by count, not as 'out of memory'."""
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    client = RuntimeClient(python=sys.executable, heartbeat_interval=0.2, heartbeat_timeout=20)
    request = {"raster": str(demo_raster), "task": "refer", "prompts": ["car"],
               "model": {"model_path": str(tiny_gguf), "n_threads": 1},
               "tiling": {"tile_size": 60000, "overlap": 0},
               "output": {"path": str(tmp_path / "out.gpkg")}}
    try:
        with pytest.raises(RuntimeClientError, match=r"A tile of 60,000 x 60,000 px .* GB of "
                                                     "memory") as refused:
            client.run(request)
        assert refused.value.kind == "RasterError"
        assert psutil.Process(client.pid).memory_info().rss < 2e9
        assert not (tmp_path / "out.gpkg").exists()
        with pytest.raises(RuntimeClientError, match="This plan has 1,048,576 tiles") as preview:
            client.plan({**request, "tiling": {"gsd": 0.0005}})
        assert "out of memory" not in preview.value.message
        assert client.plan({**request, "tiling": {"tile_size": 512, "overlap": 0}}).tiles == 4
    finally:
        client.close()
