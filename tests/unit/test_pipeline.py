"""run_job end to end on a real raster with the tiny GeoChat GGUF through llama.cpp and HTTP."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from pyproj import CRS
from shapely.geometry import box

from geochat_qgis.core.backends.base import CancelToken
from geochat_qgis.core.backends.factory import BackendSpec
from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.errors import BackendError, ModelError, RasterError
from geochat_qgis.core.pipeline import Job, run_job
from geochat_qgis.core.tiling import TileSpec

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    with LlamaCppBackend(tiny_gguf) as loaded:
        yield loaded


def refer_job(raster, **changes) -> Job:
    settings = dict(raster=str(raster), task="refer", prompts=["car"], grammar=True,
                    tile_spec=TileSpec(tile_size=504, overlap=0.0), max_new_tokens=40)
    settings.update(changes)
    return Job(**settings)


def test_refer_job_gives_georeferenced_merged_detections(backend, demo_raster):
    progress = []
    with rasterio.open(demo_raster) as ds:
        footprint, raster_crs = box(*ds.bounds), CRS(ds.crs)
        left, top = ds.bounds.left, ds.bounds.top
    extent = (left, top - 500, left + 500, top)  # ~840 px square: 2 x 2 tiles
    result = run_job(refer_job(demo_raster, prompts=["car", "road"], extent=extent), backend,
                     on_progress=progress.append)
    assert result.complete and not result.failures
    assert result.tiles_planned == result.tiles_done == 4
    assert len(result.answers) == 4 * 2  # every tile asked every prompt
    assert [p.done for p in progress] == [1, 2, 3, 4] and progress[-1].total == 4
    assert result.detections
    assert CRS(result.crs) == raster_crs
    for detection in result.detections:
        assert detection.frame == "raster" and CRS(detection.crs) == raster_crs
        assert footprint.buffer(1e-6).contains(detection.geometry)
        assert detection.label in ("car", "road")
        assert detection.attributes["task"] == "refer"
        assert detection.attributes["run_id"] == result.run_id
        assert detection.attributes["model"] == "llama.cpp:model.gguf"
    assert sum(a.detections for a in result.answers) >= len(result.detections)  # merged


def test_output_crs_and_extent(backend, demo_raster):
    with rasterio.open(demo_raster) as ds:
        left, bottom = ds.bounds.left, ds.bounds.bottom
    extent = (left, bottom, left + 300, bottom + 300)  # ~500 px: one tile
    result = run_job(refer_job(demo_raster, extent=extent, output_crs="EPSG:4326"), backend)
    assert result.tiles_planned == 1 and result.crs == "EPSG:4326"
    for detection in result.detections:
        lon_min, lat_min, lon_max, lat_max = detection.geometry.bounds
        assert 128 < lon_min <= lon_max < 129 and 37 < lat_min <= lat_max < 38  # Korea


def test_cancel_keeps_finished_tiles(backend, demo_raster):
    cancel = CancelToken()
    result = run_job(refer_job(demo_raster, max_new_tokens=20), backend, cancel=cancel,
                     on_progress=lambda progress: cancel.cancel())
    assert result.cancelled and not result.complete
    assert result.tiles_done == 1 and result.detections
    assert {d.tile_id for d in result.detections} == {result.answers[0].tile_id}


def test_unreadable_blocks_are_recorded_and_the_job_goes_on(backend, data_dir):
    result = run_job(refer_job(data_dir / "corrupt.tif", max_new_tokens=2), backend)
    assert result.failures and all("unreadable" in f.message for f in result.failures)
    assert result.tiles_done + len(result.failures) == result.tiles_planned


def test_job_from_spec_and_bad_inputs(tiny_gguf, demo_raster, data_dir, tmp_path):
    spec = BackendSpec("llama.cpp", str(tiny_gguf))
    result = run_job(refer_job(demo_raster, backend=spec, max_new_tokens=4,
                               extent=(14321853.2, 4532410.1, 14321900, 4532450)))
    assert result.complete and result.tiles_done == 1
    with pytest.raises(RasterError):
        run_job(refer_job(data_dir / "missing.tif", backend=spec))
    with pytest.raises(ModelError, match="not a GGUF"):
        run_job(refer_job(demo_raster, backend=BackendSpec("llama.cpp", str(demo_raster))))


def test_server_down_fails_fast_with_the_reason(demo_raster):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = OpenAIHttpBackend("geochat", settings=HttpSettings(
        base_url=f"http://127.0.0.1:{port}/v1", retries=0, max_in_flight=1))
    with pytest.raises(BackendError, match="connection refused"):  # checked before any tile
        run_job(refer_job(demo_raster), http)


def test_server_killed_mid_run_keeps_earlier_detections(tiny_gguf, demo_raster, tmp_path):
    """Tiles after the kill fail; three batches in a row stop the run; tile 1 is kept."""
    from test_backend_http_server import LlamaServer

    server = LlamaServer(tiny_gguf, tmp_path / "server.log")
    try:
        http = OpenAIHttpBackend("tiny", settings=HttpSettings(
            base_url=server.url, retries=1, backoff=0.01, max_in_flight=1))
        result = run_job(refer_job(demo_raster), http,
                         on_progress=lambda progress: server.stop())
    finally:
        server.stop()
    assert result.tiles_done == 1 and result.detections
    assert "Cannot connect" in result.error or "Cannot reach" in result.error
    assert len(result.failures) == 3
    assert np.all([d.tile_id == result.answers[0].tile_id for d in result.detections])


def test_all_nodata_raster_skips_every_tile(backend, data_dir):
    progress = []
    result = run_job(refer_job(data_dir / "all-nodata.tif"), backend, on_progress=progress.append)
    assert result.complete and result.tiles_planned > 0
    assert result.tiles_skipped == result.tiles_planned and result.tiles_done == 0
    assert not result.answers and not result.detections
    assert progress[-1].done == progress[-1].total == result.tiles_planned
