"""Small rasters, odd AOIs and a dropped box (issue 15: 9, 12, 13)."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine

from geochat_qgis.core.errors import RasterError
from geochat_qgis.core.results import Detection, georeference
from geochat_qgis.core.tile_reading import iter_tiles
from geochat_qgis.core.tiling import TileSpec, plan_tiles


def _raster(path, data, dtype="uint8", nodata=None):
    count, height, width = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                       dtype=dtype, crs="EPSG:32633", nodata=nodata,
                       transform=Affine(1.0, 0, 500000, 0, -1.0, 4000000)) as ds:
        ds.write(data.astype(dtype))
    return path


def test_a_1x1_raster_is_one_tile_of_data_not_nodata(tmp_path):
    path = _raster(tmp_path / "dot.tif", np.full((3, 1, 1), 200))
    plan = plan_tiles(path, TileSpec(tile_size=504))
    (tile,) = list(iter_tiles(plan))
    assert tile.nodata_frac == 0.0 and plan.counts.skipped_nodata == 0
    assert (tile.image[0, 0] == 200).all()


def test_a_small_float_raster_70_percent_valid_is_kept(tmp_path):
    data = np.random.default_rng(0).normal(size=(1, 64, 64)).astype("float32")
    data[0, :, 45:] = np.nan  # 19 of 64 columns: 70 % valid
    plan = plan_tiles(_raster(tmp_path / "f.tif", data, "float32"), TileSpec(tile_size=504))
    (tile,) = list(iter_tiles(plan))
    assert tile.nodata_frac == pytest.approx(19 / 64)
    dense = plan_tiles(tmp_path / "f.tif", TileSpec(tile_size=504, max_nodata=0.2))
    assert list(iter_tiles(dense)) == [] and dense.counts.skipped_nodata == 1


def test_a_bow_tie_aoi_is_repaired_not_called_empty(tmp_path):
    path = _raster(tmp_path / "r.tif", np.full((3, 400, 400), 90))
    bow_tie = shapely.Polygon([(500000, 3999600), (500400, 4000000), (500400, 3999600),
                               (500000, 4000000)])
    assert bow_tie.area == 0 and not bow_tie.is_valid
    plan = plan_tiles(path, TileSpec(tile_size=100, overlap=0), aoi=bow_tie)
    assert len(plan) > 0 and plan.area.area == pytest.approx(400 * 400 / 2)
    with pytest.raises(RasterError, match=r"The AOI \(the polygons given\) is empty"):
        plan_tiles(path, TileSpec(tile_size=100), aoi=shapely.LineString([(0, 0), (1, 1)]))


def test_an_unknown_extent_crs_and_infinite_extent_are_named(tmp_path):
    path = _raster(tmp_path / "r.tif", np.full((3, 50, 50), 90))
    with pytest.raises(RasterError, match="extent CRS 'EPSG:999999'"):
        plan_tiles(path, TileSpec(tile_size=32), extent=(0, 0, 1, 1), extent_crs="EPSG:999999")
    with pytest.raises(RasterError, match="not four finite numbers"):
        plan_tiles(path, TileSpec(tile_size=32), extent=(-np.inf, -np.inf, np.inf, np.inf))


def test_georeference_drops_only_the_boxes_off_the_globe(data_dir):
    plan = plan_tiles(data_dir / "goes.tif", TileSpec(tile_size=542))
    (tile,) = plan.tiles
    corner = Detection("space", shapely.box(0, 0, 10, 10))
    centre = Detection("cloud", shapely.box(260, 260, 280, 280))
    with pytest.raises(RasterError, match="does not exist in EPSG:4326"):
        georeference([corner, centre], tile, "EPSG:4326")
    dropped: list[str] = []
    (kept,) = georeference([corner, centre], tile, "EPSG:4326", dropped)
    assert kept.label == "cloud" and kept.crs == "EPSG:4326"
    assert len(dropped) == 1 and "'space'" in dropped[0]
