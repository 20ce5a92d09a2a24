"""Band choice, nodata masks and the 8-bit stretch of core.raster on real files."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.windows import Window

from geochat_qgis.core import raster as raster_module
from geochat_qgis.core.errors import RasterError
from geochat_qgis.core.raster import RasterReader, Stretch, open_raster, resolve_bands
from test_raster_fixtures import gradient, write_raster


@pytest.mark.parametrize("name, bands", [
    ("cogeo.tif", (1, 2, 3)),
    ("RGBA.uint16.tif", (3, 2, 1)),  # stored blue, green, red, alpha
    ("all-nodata.tif", (3, 2, 1)),
    ("shade.tif", (1, 1, 1)),  # one band: grey
])
def test_default_bands_follow_colour_interpretation(data_dir, name, bands):
    with open_raster(data_dir / name) as ds:
        assert resolve_bands(ds) == bands


def test_default_bands_without_colour_names_are_1_to_3_skipping_alpha(tmp_path):
    plain = write_raster(tmp_path / "p.tif", gradient(8, 8, 4), colorinterp=[
        ColorInterp.undefined] * 4)
    alpha_first = write_raster(tmp_path / "a.tif", gradient(8, 8, 4), colorinterp=[
        ColorInterp.alpha, ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined])
    with open_raster(plain) as ds:
        assert resolve_bands(ds) == (1, 2, 3)
    with open_raster(alpha_first) as ds:
        assert resolve_bands(ds) == (2, 3, 4)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "int8", "uint8"])
def test_lookup_tables_match_the_arithmetic_stretch(dtype):
    info = np.iinfo(dtype)
    values = np.linspace(info.min, info.max, 4001).astype(dtype).reshape(1, -1)
    stretch = Stretch((info.min / 3, 0.0, -1.0), (info.max / 2, 1.0, 1.0))
    out = np.empty((1, values.shape[1], 3), dtype=np.uint8)
    stretch.apply([values] * 3, out)
    for channel in range(3):
        assert (out[..., channel] == stretch.scale(values, channel)).all()
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255  # clipped at both ends


def test_float_stretch_maps_percentiles_and_nan(tmp_path):
    stretch = Stretch((0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    values = np.array([[np.nan, -1.0, 0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    assert stretch.scale(values, 0).tolist() == [[0, 0, 0, 128, 255, 255]]


def test_reader_masks_nodata_alpha_internal_mask_and_nan(data_dir):
    window = Window(0, 0, 100, 100)
    with RasterReader(data_dir / "RGB.byte.tif") as reader:  # nodata 0 in every band
        _, invalid = reader.read(window, (100, 100), Resampling.nearest)
        assert invalid[0, 0] and invalid.mean() > 0.5
    with RasterReader(data_dir / "RGBA.uint16.tif") as reader:  # alpha band
        assert reader.alpha == 4 and reader.distinct == [3, 2, 1]
        with rasterio.open(data_dir / "RGBA.uint16.tif") as ds:
            alpha = ds.read(4, window=window)
        _, invalid = reader.read(window, (100, 100), Resampling.nearest)
        assert (invalid == (alpha == 0)).all()
    with RasterReader(data_dir / "goes.tif") as reader:  # internal per-dataset mask
        assert reader.use_dataset_mask
        _, invalid = reader.read(Window(0, 0, 542, 542), (271, 271), Resampling.average)
        assert invalid[0, 0] and not invalid[135, 135]
    with RasterReader(data_dir / "float_nan.tif") as reader:  # NaN nodata, float
        _, invalid = reader.read(Window(0, 0, 3, 2), (2, 3), Resampling.nearest)
        assert invalid.tolist() == [[False, False, True], [False, False, False]]


def test_grey_band_is_read_once(data_dir):
    with RasterReader(data_dir / "shade.tif") as reader:
        assert reader.bands == (1, 1, 1) and reader.distinct == [1]
        rgb, invalid = reader.read_rgb(Window(0, 0, 64, 64), (64, 64), Resampling.nearest,
                                       None, (1, 2, 3))
        assert (rgb[..., 0] == rgb[..., 2]).sum() + invalid == 64 * 64


def test_stretch_sample_grid_for_large_rasters_without_overviews(tmp_path, monkeypatch):
    data = gradient(512, 512, 3, "uint16")
    path = write_raster(tmp_path / "big.tif", data)
    whole = Window(0, 0, 512, 512)
    with RasterReader(path) as reader:
        exact = reader.compute_stretch(whole)
        # pretend 512 x 512 is large: a grid of 64 small windows stands in for the whole area
        monkeypatch.setattr(raster_module, "WHOLE_READ_PIXELS", 100)
        monkeypatch.setattr(raster_module, "SAMPLE_WINDOW", 32)
        sampled = reader.compute_stretch(whole)
    assert exact.lows[0] == pytest.approx(np.percentile(data[0], 2))
    for low, high, s_low, s_high in zip(exact.lows, exact.highs, sampled.lows, sampled.highs):
        span = high - low
        assert abs(s_low - low) < 0.1 * span and abs(s_high - high) < 0.1 * span


def test_stretch_ignores_nodata_values(tmp_path):
    data = gradient(64, 64, 3, "uint16")
    data[:, :32] = 0  # half nodata: counted, the 2% percentile would be 0
    path = write_raster(tmp_path / "nd.tif", data, nodata=0)
    with RasterReader(path) as reader:
        stretch = reader.compute_stretch(Window(0, 0, 64, 64))
    assert stretch.lows[0] == pytest.approx(np.percentile(data[0, 32:], 2))


def test_open_errors_are_clear(tmp_path):
    with pytest.raises(RasterError, match="not found"):
        open_raster(tmp_path / "missing.tif")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(RasterError, match="Cannot read .*GDAL-readable"):
        open_raster(tmp_path / "bad.tif")
    with pytest.raises(RasterError, match="Cannot read"):
        open_raster("/vsimem/nothing-here.tif")  # a GDAL source string, not a path


def test_gdal_block_cache_holds_one_row_of_tiles_within_bounds(data_dir, tmp_path, monkeypatch):
    from rasterio.env import get_gdal_config

    from geochat_qgis.core.tile_reading import iter_tiles
    from geochat_qgis.core.tiling import TileSpec, plan_tiles

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    path = write_raster(tmp_path / "t.tif", gradient(2048, 600, 4, "uint16"), tiled=True)
    with RasterReader(path) as reader:  # 256 px blocks of 4 x 2 bytes: 512 KiB each
        assert reader.cache_bytes(2048, 504, 1.0) == raster_module.GDAL_CACHE_MIN
        wide = reader.cache_bytes(100_000, 504, 1.0)
        assert wide == raster_module.GDAL_CACHE_MAX
        assert reader.cache_bytes(20_000, 504, 1.0) == int(1.25 * 80 * 3 * 2**19)
    plan = plan_tiles(data_dir / "cogeo.tif", TileSpec(tile_size=256))
    next(iter_tiles(plan))
    assert get_gdal_config("GDAL_CACHEMAX") == raster_module.GDAL_CACHE_MIN


def test_paletted_band_is_coloured_through_its_table(tmp_path):
    data = np.zeros((1, 32, 32), dtype=np.uint8)
    data[0, :, 16:] = 2
    path = tmp_path / "palette.tif"
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.Affine(2, 0, 0, 0, -2, 0)) as dst:
        dst.write(data)
        dst.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 255, 0, 255), 2: (0, 0, 255, 255)})
    with RasterReader(path) as reader:
        assert reader.palette is not None and not reader.needs_stretch
        rgb, invalid = reader.read_rgb(Window(0, 0, 32, 32), (16, 16), Resampling.average, None,
                                       (0, 0, 0))
    assert invalid == 0
    assert (rgb[:, :8] == (255, 0, 0)).all() and (rgb[:, 8:] == (0, 0, 255)).all()
