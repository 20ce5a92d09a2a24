"""Tile plans and tile reading over every shipped edge-case raster and generated ones."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.enums import ColorInterp
from shapely.geometry import box

from geochat_qgis.core.errors import RasterError
from geochat_qgis.core.georef import reproject_geometry, transform_extent
from geochat_qgis.core.tile_reading import iter_tiles
from geochat_qgis.core.tile_types import GEOCHAT_PAD_RGB
from geochat_qgis.core.tiling import TileSpec, plan_tiles
from test_raster_fixtures import GEOGRAPHIC, MERCATOR, ROTATED, UTM, gradient, write_raster

PAD = np.array(GEOCHAT_PAD_RGB, dtype=np.uint8)

# every raster in tests/data (README): size check, then what its edge case must give
SHIPPED = ["cogeo.tif", "RGB.byte.tif", "RGBA.uint16.tif", "rgb1_fake_nir_epsg3857.tif",
           "shade.tif", "world.rgb.tif", "goes.tif", "rotated.tif", "float_nan.tif",
           "all-nodata.tif", "corrupt.tif"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_raster_tiles_or_fails_clearly(data_dir, name):
    path = data_dir / name
    with rasterio.open(path) as ds:
        has_crs = ds.crs is not None
    if not has_crs:
        with pytest.raises(RasterError, match="no CRS.*gdal_edit.py -a_srs"):
            plan_tiles(path, TileSpec(tile_size=112))
    plan = plan_tiles(path, TileSpec(tile_size=112, max_nodata=1.0), pixel_space=not has_crs)
    events = []
    tiles = list(iter_tiles(plan, on_event=events.append))
    assert len(plan) > 0 and plan.counts.read + plan.counts.failed == len(plan)
    for tile in tiles:
        assert tile.image.shape == (112, 112, 3) and tile.image.dtype == np.uint8
        assert (tile.crs is None) == (not has_crs)
        assert tile.footprint.area > 0 and np.isfinite(tile.gsd_m) and tile.gsd_m > 0
    assert [t.image for t in plan.tiles] == [None] * len(plan)  # the plan keeps no pixels
    if name == "corrupt.tif":
        assert plan.counts.failed > 0 and plan.counts.read > 0
        assert {e.kind for e in events} == {"failed"}
        assert "TIFFReadEncodedTile" in plan.counts.failures[0][1]
    else:
        assert plan.counts.failed == 0 and not events


def test_default_bands_stretch_and_alpha_of_rgba_uint16(data_dir):
    # bands are stored blue, green, red, alpha; the colour is constant 10000, alpha 0 or 255
    plan = plan_tiles(data_dir / "RGBA.uint16.tif", TileSpec(tile_size=700, max_nodata=1.0))
    assert plan.bands == (3, 2, 1)
    (tile,) = list(iter_tiles(plan))
    with rasterio.open(data_dir / "RGBA.uint16.tif") as ds:
        alpha = ds.read(4)
    image = tile.image
    opaque = image[:411, :634][alpha > 0]
    assert (opaque == 128).all()  # a constant channel becomes mid-grey
    assert (image[:411, :634][alpha == 0] == PAD).all()  # transparent: the pad colour
    assert (image[411:] == PAD).all() and (image[:, 634:] == PAD).all()  # padded, not stretched
    expected = 1 - (alpha > 0).sum() / alpha.size  # of the raster's pixels, not the padding
    assert tile.nodata_frac == pytest.approx(expected, abs=1e-9)


def test_stretch_is_computed_once_per_job_so_tiles_match(tmp_path):
    data = gradient(600, 300, 3, "uint16")
    data[:, :, 300:] //= 4  # the right half is darker: per-tile stretches would hide that
    path = write_raster(tmp_path / "u16.tif", data)
    plan = plan_tiles(path, TileSpec(tile_size=300, overlap=0))
    left, right = list(iter_tiles(plan))
    stretch = plan.stretch
    assert stretch is not None and stretch.lows[0] < stretch.highs[0]
    assert right.image.mean() < 0.5 * left.image.mean()
    # both tiles are the job's one stretch of their own values, computed over the whole area
    for tile in (left, right):
        raw = data[:, :, tile.col_off:tile.col_off + 300]
        expected = np.stack([stretch.scale(raw[i], i) for i in range(3)], axis=-1)
        assert (tile.image == expected).all()
    whole = np.percentile(data[0], [2, 98])
    assert (stretch.lows[0], stretch.highs[0]) == pytest.approx(tuple(whole), rel=0.02)
    list(iter_tiles(plan))
    assert plan.stretch is stretch  # a second pass reuses the job's stretch


def test_float_nan_and_single_band_grey(data_dir):
    plan = plan_tiles(data_dir / "float_nan.tif", TileSpec(tile_size=4, max_nodata=1.0),
                      pixel_space=True)
    (tile,) = list(iter_tiles(plan))
    image = tile.image
    assert (image[0, 2] == PAD).all()  # the NaN pixel
    assert (image[:, 3] == PAD).all() and (image[2:] == PAD).all()  # padding of a 3x2 raster
    grey = image[:2, :3].reshape(-1, 3)[[0, 1, 3, 4, 5]]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert image[0, 0, 0] > image[1, 1, 0]  # 1.41 is brighter than -0.23
    assert tile.nodata_frac == pytest.approx(1 / 6)  # one NaN of six pixels (padding is not nodata)


def test_all_nodata_gives_zero_tiles_and_says_so(data_dir):
    plan = plan_tiles(data_dir / "all-nodata.tif", TileSpec(tile_size=64))
    events = []
    assert list(iter_tiles(plan, on_event=events.append)) == []
    assert plan.counts.skipped_nodata == len(plan) == len(events) > 0
    assert all(e.kind == "skipped" and e.tile.nodata_frac == 1.0 for e in events)


def test_nodata_collar_and_dataset_mask_count_as_nodata(data_dir):
    plan = plan_tiles(data_dir / "RGB.byte.tif", TileSpec(tile_size=791, max_nodata=1.0))
    (tile,) = list(iter_tiles(plan))
    with rasterio.open(data_dir / "RGB.byte.tif") as ds:
        collar = (ds.read() == 0).all(axis=0)
    assert (tile.image[:718][collar] == PAD).all()
    assert tile.nodata_frac == pytest.approx(collar.sum() / collar.size)
    plan = plan_tiles(data_dir / "goes.tif", TileSpec(tile_size=542, max_nodata=1.0))
    (tile,) = list(iter_tiles(plan))
    assert 0.15 < tile.nodata_frac < 0.3  # space around the disc (internal mask)
    assert (tile.image[0, 0] == PAD).all() and not (tile.image[271, 271] == PAD).all()


def test_edge_tiles_are_shifted_inward_and_overlap_is_kept(tmp_path):
    path = write_raster(tmp_path / "g.tif", gradient(1000, 700))
    plan = plan_tiles(path, TileSpec(tile_size=256, overlap=0.25))
    assert plan.step_px == 192
    cols = sorted({t.col_off for t in plan.tiles})
    rows = sorted({t.row_off for t in plan.tiles})
    assert cols == [0, 192, 384, 576, 744] and rows == [0, 192, 384, 444]
    assert all(t.width == t.height == 256 for t in plan.tiles)
    with rasterio.open(path) as ds:
        raw = ds.read()
    for tile in iter_tiles(plan):  # native GSD: the exact pixels, never resampled
        window = raw[:, tile.row_off:tile.row_off + 256, tile.col_off:tile.col_off + 256]
        assert (tile.image == window.transpose(1, 2, 0)).all()
        assert tile.nodata_frac == 0.0
    ids = {t.tile_id for t in plan.tiles}
    assert "r3_c4" in ids and len(ids) == 20


@pytest.mark.parametrize("overviews", [(), (2,)], ids=["direct", "overview"])
def test_coarser_gsd_averages_and_keeps_the_georeference(tmp_path, overviews):
    rows, cols = np.mgrid[0:512, 0:512]
    data = np.stack([(rows + 2 * cols) // 6, (2 * rows + cols) // 6, (rows + cols) // 4])
    path = write_raster(tmp_path / "g.tif", data.astype(np.uint8), tiled=True,
                        overviews=overviews)
    plan = plan_tiles(path, TileSpec(tile_size=128, overlap=0, gsd=20.0))
    assert plan.window_px == 256 and plan.scale == 2.0 and len(plan) == 4
    blocks = data.reshape(3, 256, 2, 256, 2).astype(float).mean(axis=(2, 4))
    for tile in iter_tiles(plan):
        assert tile.gsd_m == pytest.approx(20.0, rel=0.001)
        r, c = tile.row_off // 2, tile.col_off // 2
        expected = blocks[:, r:r + 128, c:c + 128].transpose(1, 2, 0)
        # the 2x2 mean, within rounding
        assert np.abs(tile.image.astype(float) - expected).max() <= 1.0
        x, y = tile.transform @ (0, 0)
        assert (x, y) == pytest.approx(UTM[1] @ (tile.col_off, tile.row_off))
        assert tile.transform.a == pytest.approx(20.0)


@pytest.mark.parametrize("frame", [UTM, MERCATOR, GEOGRAPHIC, ROTATED],
                         ids=["utm", "mercator", "geographic", "rotated"])
def test_footprints_cover_an_extent_given_in_another_crs(tmp_path, frame):
    crs, transform = frame
    path = write_raster(tmp_path / "g.tif", gradient(900, 800), crs, transform)
    with rasterio.open(path) as ds:
        raster_box = _footprint(ds)
    inner = raster_box.centroid.buffer(0.15 * np.sqrt(raster_box.area))
    lonlat = reproject_geometry(inner, crs, "EPSG:4326").bounds
    plan = plan_tiles(path, TileSpec(tile_size=128), extent=lonlat, extent_crs="EPSG:4326")
    wanted = box(*transform_extent(lonlat, "EPSG:4326", crs)).intersection(raster_box)
    covered = shapely.union_all([t.footprint for t in plan.tiles])
    assert covered.buffer(1e-6).contains(wanted)
    whole = plan_tiles(path, TileSpec(tile_size=128))
    assert 0 < len(plan) < len(whole)


def _footprint(ds):
    corners = [(0, 0), (ds.width, 0), (ds.width, ds.height), (0, ds.height)]
    return shapely.Polygon([ds.transform @ c for c in corners])


def test_extent_that_misses_the_raster_names_both_extents(data_dir):
    with pytest.raises(RasterError) as err:
        plan_tiles(data_dir / "RGB.byte.tif", extent=(0, 0, 10, 10), extent_crs="EPSG:4326")
    message = str(err.value)
    assert "misses the raster" in message and "EPSG:32618" in message
    assert "101985.0" in message  # the raster's own xmin, in the same CRS as the request


def test_small_extent_gives_one_centred_tile(tmp_path):
    path = write_raster(tmp_path / "g.tif", gradient(1000, 1000))
    x, y = UTM[1] @ (500, 500)
    plan = plan_tiles(path, TileSpec(tile_size=100), extent=(x - 50, y - 50, x + 50, y + 50))
    (tile,) = plan.tiles
    assert (tile.col_off, tile.row_off) == (450, 450)
    (x0, y0), (x1, y1) = UTM[1] @ (0, 0), UTM[1] @ (10, 10)
    plan = plan_tiles(path, TileSpec(tile_size=100), extent=(x0, y1, x1, y0))
    assert [(t.col_off, t.row_off) for t in plan.tiles] == [(0, 0)]


def test_aoi_geometry_and_file_skip_tiles_that_miss_it(tmp_path):
    import pyogrio.raw

    path = write_raster(tmp_path / "g.tif", gradient(1024, 1024))
    diagonal = shapely.LineString([UTM[1] @ (0, 0), UTM[1] @ (1024, 1024)]).buffer(30)
    plan = plan_tiles(path, TileSpec(tile_size=256, overlap=0), aoi=diagonal)
    assert sorted((t.row, t.col) for t in plan.tiles) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    assert all(t.footprint.intersects(diagonal) for t in plan.tiles)
    lonlat = reproject_geometry(diagonal, UTM[0], "EPSG:4326")
    vector = tmp_path / "aoi.gpkg"
    pyogrio.raw.write(str(vector), shapely.to_wkb(np.array([lonlat], dtype=object)), [], [],
                      driver="GPKG", geometry_type="Polygon", crs="EPSG:4326")
    from_file = plan_tiles(path, TileSpec(tile_size=256, overlap=0), aoi=vector)
    assert [t.tile_id for t in from_file.tiles] == [t.tile_id for t in plan.tiles]
    with pytest.raises(RasterError, match="AOI.*empty"):
        plan_tiles(path, aoi=shapely.Polygon())
    with pytest.raises(RasterError, match="AOI file not found"):
        plan_tiles(path, aoi=tmp_path / "missing.gpkg")


def test_geographic_world_raster_gsd_in_metres(data_dir):
    plan = plan_tiles(data_dir / "world.rgb.tif", TileSpec(tile_size=128, overlap=0))
    by_row = {}
    for tile in plan.tiles:
        by_row.setdefault(tile.row, []).append(tile.gsd_m)
    equator_row = min(by_row, key=lambda r: abs(r - 0.5))  # rows 0-1 of 2 straddle the equator
    assert 60_000 < by_row[equator_row][0] < 80_000  # 0.703 degree at mid latitudes, in metres
    plan = plan_tiles(data_dir / "world.rgb.tif", TileSpec(tile_size=128, gsd=156_000))
    assert plan.window_px == pytest.approx(256, abs=2)


def test_goes_whole_world_extent_uses_the_part_that_transforms(data_dir):
    plan = plan_tiles(data_dir / "goes.tif", TileSpec(tile_size=256),
                      extent=(-180, -90, 180, 90), extent_crs="EPSG:4326")
    assert plan.area_window[2] > 500 and plan.area_window[3] > 500  # (nearly) the whole disc
    assert all(np.isfinite(t.gsd_m) for t in plan.tiles)


def test_rotated_raster_without_crs_in_pixel_space(data_dir):
    plan = plan_tiles(data_dir / "rotated.tif", TileSpec(tile_size=16, max_nodata=1.0),
                      pixel_space=True)
    assert plan.crs is None
    (tile,) = plan.tiles
    with rasterio.open(data_dir / "rotated.tif") as ds:
        assert tile.transform == ds.transform  # 16 px tile at native scale: the raster's affine
        data = ds.read(1)
    image = next(iter_tiles(plan)).image
    assert (image[:15, :10, 0] == data).all() and (image[:, 10:] == PAD).all()
    corners = list(tile.footprint.exterior.coords)[:2]
    assert corners[0] == pytest.approx((100.0, 200.0))
    assert corners[1][1] != corners[0][1]  # the top edge is rotated, not horizontal


def test_bands_selection_and_errors(data_dir):
    plan = plan_tiles(data_dir / "RGBA.uint16.tif", TileSpec(bands=(4, 3, 2)))
    assert plan.bands == (4, 3, 2)
    assert plan_tiles(data_dir / "cogeo.tif", TileSpec(bands=(2,))).bands == (2, 2, 2)
    assert plan_tiles(data_dir / "shade.tif").bands == (1, 1, 1)
    with pytest.raises(RasterError, match="Band 5 does not exist.*4 band"):
        plan_tiles(data_dir / "RGBA.uint16.tif", TileSpec(bands=(1, 2, 5)))
    with pytest.raises(RasterError, match="one band .* or three"):
        plan_tiles(data_dir / "cogeo.tif", TileSpec(bands=(1, 2)))


@pytest.mark.parametrize("spec, message", [
    (TileSpec(tile_size=0), "Tile size"),
    (TileSpec(overlap=504), "Overlap"),
    (TileSpec(gsd=-1.0), "GSD"),
    (TileSpec(max_nodata=1.5), "max_nodata"),
])
def test_bad_specs_are_refused(demo_raster, spec, message):
    with pytest.raises(RasterError, match=message):
        plan_tiles(demo_raster, spec)


def test_unreadable_inputs_are_refused(tmp_path):
    with pytest.raises(RasterError, match="not found"):
        plan_tiles(tmp_path / "nope.tif")
    text = tmp_path / "fake.tif"
    text.write_text("not a raster")
    with pytest.raises(RasterError, match="Cannot read"):
        plan_tiles(text)


def test_tiles_are_produced_lazily(demo_raster):
    plan = plan_tiles(demo_raster, TileSpec(tile_size=128))
    tiles = iter_tiles(plan)
    assert plan.counts.read == 0
    first = next(tiles)
    assert plan.counts.read == 1 and first.tile_id == "r0_c0"
    assert any(t.name.startswith("geochat-tiles") for t in threading.enumerate())
    tiles.close()  # stopping early ends the read-ahead thread
    assert not any(t.name.startswith("geochat-tiles") for t in threading.enumerate())
    assert [t.tile_id for t in iter_tiles(plan, prefetch=False)] == [
        t.tile_id for t in iter_tiles(plan)]


def test_colour_interpretation_decides_the_rgb_order(tmp_path):
    data = np.zeros((3, 64, 64), dtype=np.uint8)
    data[0] = 200  # stored first, but its colour interpretation says blue
    path = write_raster(tmp_path / "bgr.tif", data, colorinterp=[
        ColorInterp.blue, ColorInterp.green, ColorInterp.red])
    (tile,) = list(iter_tiles(plan_tiles(path, TileSpec(tile_size=64))))
    assert (tile.image[..., 2] == 200).all() and (tile.image[..., 0] == 0).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_raster_with_ground_control_points_only_is_refused_clearly(tmp_path):
    from rasterio.control import GroundControlPoint

    path = tmp_path / "gcps.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3,
                       dtype="uint8") as dst:
        dst.write(gradient(64, 64))
        dst.gcps = ([GroundControlPoint(0, 0, 500000, 5000000),
                     GroundControlPoint(64, 0, 500640, 5000000),
                     GroundControlPoint(0, 64, 500000, 4999360)], rasterio.crs.CRS.from_epsg(32633))
    with pytest.raises(RasterError, match="ground control points only.*gdalwarp"):
        plan_tiles(path)
    assert len(plan_tiles(path, TileSpec(tile_size=64), pixel_space=True)) == 1


def test_gdal_source_strings_and_finer_gsd(data_dir, tmp_path):
    import zipfile

    archive = tmp_path / "rasters.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(data_dir / "shade.tif", "inner/shade.tif")
    source = f"/vsizip/{archive}/inner/shade.tif"
    plan = plan_tiles(source, TileSpec(tile_size=256, overlap=0))
    direct = plan_tiles(data_dir / "shade.tif", TileSpec(tile_size=256, overlap=0))
    assert len(plan) == len(direct) == 16
    for a, b in zip(iter_tiles(plan), iter_tiles(direct)):
        assert a.tile_id == b.tile_id and (a.image == b.image).all()
    # a finer GSD than native: smaller windows upsampled to the full tile size
    fine = plan_tiles(data_dir / "shade.tif", TileSpec(tile_size=256, gsd=direct.native_gsd_m / 2))
    assert fine.window_px == 128 and fine.scale == 0.5
    tile = next(iter_tiles(fine))
    assert tile.image.shape == (256, 256, 3)
    assert tile.gsd_m == pytest.approx(direct.tiles[0].gsd_m / 2, rel=0.01)


def test_memory_stays_proportional_to_one_tile(tmp_path):
    import tracemalloc

    data = gradient(2048, 2048, 3, "uint16")  # 24 MiB of pixels, 81 tiles of 0.2 MiB
    path = write_raster(tmp_path / "big.tif", data, tiled=True)
    del data
    plan = plan_tiles(path, TileSpec(tile_size=256, overlap=0.1))
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_tiles(plan))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(plan) == 81
    assert peak < 12 * 256 * 256 * 3 * 2  # a dozen tile buffers, not the raster
