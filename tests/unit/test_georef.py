"""Tile pixels <-> raster CRS <-> any CRS, on real generated and shipped rasters."""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from pyproj import Transformer
from shapely.geometry import Point, box

from geochat_qgis.core.errors import RasterError
from geochat_qgis.core.georef import (ground_pixel_size, map_to_tile, reproject_geometry,
                                      tile_to_crs, tile_to_map, transform_extent)
from geochat_qgis.core.tiling import TileSpec, plan_tiles
from test_raster_fixtures import GEOGRAPHIC, MERCATOR, ROTATED, UTM, gradient, write_raster

FRAMES = {"utm": UTM, "mercator": MERCATOR, "geographic": GEOGRAPHIC, "rotated": ROTATED}


@pytest.fixture(params=sorted(FRAMES))
def plan(request, tmp_path):
    crs, transform = FRAMES[request.param]
    path = write_raster(tmp_path / f"{request.param}.tif", gradient(300, 200), crs, transform)
    return plan_tiles(path, TileSpec(tile_size=128, overlap=16, gsd=None))


def test_round_trip_pixel_map_pixel_within_1e_6(plan):
    rng = np.random.default_rng(0)
    for tile in plan.tiles:
        pts = shapely.points(rng.uniform(0, 128, size=(50, 2)))
        back = [map_to_tile(tile, tile_to_map(tile, p)) for p in pts]
        error = np.abs(shapely.get_coordinates(back) - shapely.get_coordinates(pts)).max()
        assert error < 1e-6


def test_tile_corners_map_to_the_footprint_and_native_pixels(plan):
    for tile in plan.tiles:
        corners = tile_to_map(tile, box(0, 0, 128, 128))
        assert corners.symmetric_difference(tile.footprint).area < 1e-9 * tile.footprint.area
        # tile pixel (x, y) is native pixel (col_off + x * scale, row_off + y * scale)
        col, row = tile.col_off + 10 * plan.scale, tile.row_off + 20 * plan.scale
        native = plan.raster_transform @ (col, row)
        mapped = tile_to_map(tile, Point(10, 20))
        assert mapped.distance(Point(native)) < 1e-6


def test_rotated_box_stays_rotated(tmp_path):
    crs, transform = ROTATED
    path = write_raster(tmp_path / "r.tif", gradient(200, 200), crs, transform)
    tile = plan_tiles(path, TileSpec(tile_size=200)).tiles[0]
    poly = tile_to_map(tile, box(0, 0, 50, 20))
    (x0, y0), (x1, y1) = tile.transform @ (0, 0), tile.transform @ (50, 0)
    # the box's top edge follows the raster's x axis: 30 degrees from east (counter-clockwise)
    assert np.degrees(np.arctan2(y1 - y0, x1 - x0)) == pytest.approx(30.0, abs=1e-6)
    assert Point(x0, y0).distance(poly) < 1e-6 and Point(x1, y1).distance(poly) < 1e-6
    assert poly.area == pytest.approx(50 * 20 * abs(transform.determinant), rel=1e-9)


def test_tile_to_crs_matches_pyproj_for_points_and_densifies_polygons(tmp_path):
    crs, transform = UTM
    path = write_raster(tmp_path / "u.tif", gradient(256, 256), crs, transform)
    tile = plan_tiles(path, TileSpec(tile_size=256)).tiles[0]
    lonlat = tile_to_crs(tile, Point(100, 50), "EPSG:4326")
    x, y = tile.transform @ (100, 50)
    expected = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    assert lonlat.x == pytest.approx(expected[0], abs=1e-9)
    assert lonlat.y == pytest.approx(expected[1], abs=1e-9)
    assert 14 < lonlat.x < 16 and 44 < lonlat.y < 46  # always_xy: lon first
    square = tile_to_crs(tile, box(0, 0, 256, 256), "EPSG:4326")
    assert len(square.exterior.coords) > 5 * 4  # edges densified before reprojection


def test_reproject_geometry_to_a_far_zone_follows_curved_edges():
    square = box(500000, 5000000, 900000, 5400000)  # a big box in UTM 33N
    moved = reproject_geometry(square, "EPSG:32633", "EPSG:32631")  # two zones west
    corners_only = shapely.transform(
        square, lambda c: np.column_stack(Transformer.from_crs(
            "EPSG:32633", "EPSG:32631", always_xy=True).transform(c[:, 0], c[:, 1])))
    # the densified polygon differs from the four-corner one by its curved edges
    assert moved.symmetric_difference(corners_only).area > 1e-4 * moved.area
    back = reproject_geometry(moved, "EPSG:32631", "EPSG:32633")
    assert back.symmetric_difference(square).area < 1e-6 * square.area


def test_reproject_off_the_globe_raises_a_clear_error(data_dir):
    plan = plan_tiles(data_dir / "goes.tif", TileSpec(tile_size=542))
    corner = tile_to_map(plan.tiles[0], Point(1, 1))  # top-left corner: space, not Earth
    with pytest.raises(RasterError, match="does not exist in EPSG:4326"):
        reproject_geometry(corner, plan.crs, "EPSG:4326")
    centre = tile_to_crs(plan.tiles[0], Point(271, 271), "EPSG:4326")
    assert centre.x == pytest.approx(-75.0, abs=0.1) and abs(centre.y) < 0.1


def test_tile_without_crs_cannot_be_reprojected(data_dir):
    plan = plan_tiles(data_dir / "rotated.tif", TileSpec(tile_size=28), pixel_space=True)
    tile = plan.tiles[0]
    assert tile.crs is None
    assert tile_to_map(tile, Point(0, 0)).coords[0] == pytest.approx((100.0, 200.0))
    with pytest.raises(RasterError, match="no CRS"):
        tile_to_crs(tile, Point(0, 0), "EPSG:4326")


def test_transform_extent_densifies_and_uses_the_part_that_transforms(data_dir):
    utm = transform_extent((14.9, 45.0, 15.1, 45.2), "EPSG:4326", "EPSG:32633")
    corners = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    xs, ys = corners.transform([14.9, 15.1, 15.1, 14.9], [45.0, 45.0, 45.2, 45.2])
    assert utm[0] <= min(xs) and utm[2] >= max(xs) and utm[1] <= min(ys) and utm[3] >= max(ys)
    # the whole world in a geostationary CRS: the corners do not exist, the disc does
    import rasterio

    with rasterio.open(data_dir / "goes.tif") as ds:
        goes_crs, disc = ds.crs.to_wkt(), ds.bounds
    xmin, ymin, xmax, ymax = transform_extent((-180, -90, 180, 90), "EPSG:4326", goes_crs)
    assert all(np.isfinite([xmin, ymin, xmax, ymax]))
    assert xmin == pytest.approx(disc.left, rel=0.02) and xmax == pytest.approx(disc.right, rel=0.02)
    with pytest.raises(RasterError, match="does not exist"):
        transform_extent((100, -10, 110, 10), "EPSG:4326", goes_crs)  # behind the Earth


def test_ground_pixel_size_in_metres():
    equator_start = Affine(0.001, 0.0, 10.0, 0.0, -0.001, 0.0)
    equator, north = ground_pixel_size("EPSG:4326", equator_start, [0, 0], [0, 60000])
    assert equator == pytest.approx(111.2, rel=0.01)  # 0.001 degree at the equator
    # 60 N: east-west sides shrink by cos(60), north-south ones do not; geometric mean
    assert north / equator == pytest.approx(np.sqrt(np.cos(np.radians(60))), rel=0.01)
    utm = ground_pixel_size(*UTM, [0], [0])[0]
    assert utm == pytest.approx(10.0, rel=0.001)  # near the central meridian
    mercator = ground_pixel_size(*MERCATOR, [0], [0])[0]
    to_lonlat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    lat = to_lonlat.transform(*(MERCATOR[1] @ (0, 0)))[1]
    assert mercator == pytest.approx(2.0 * np.cos(np.radians(lat)), rel=0.01)  # true ground size
    assert ground_pixel_size(None, ROTATED[1], [0], [0])[0] == pytest.approx(5.0)  # nominal
