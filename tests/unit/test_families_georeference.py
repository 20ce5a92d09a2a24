"""Parsed detections georeferenced with the tiling core land where rasterio's transform says."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.warp import transform as warp_transform

from geochat_qgis.core.families import get_family
from geochat_qgis.core.georef import map_to_tile, reproject_geometry
from geochat_qgis.core.results import georeference
from geochat_qgis.core.tiling import TileSpec, plan_tiles


@pytest.fixture(scope="module")
def rotated_raster(tmp_path_factory):
    """A UTM GeoTIFF whose geotransform is rotated 30 degrees (rows and columns not N/E)."""
    path = tmp_path_factory.mktemp("rot") / "rotated_utm.tif"
    transform = Affine.translation(500000, 4500000) @ Affine.rotation(30) @ Affine.scale(2, -2)
    profile = dict(driver="GTiff", width=600, height=600, count=3, dtype="uint8",
                   crs="EPSG:32633", transform=transform)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.full((3, 600, 600), 90, dtype=np.uint8))
    return path


def _raster(name, data_dir, rotated_raster):
    return rotated_raster if name == "rotated" else data_dir / name


@pytest.mark.parametrize("name", ["RGB.byte.tif", "cogeo.tif", "world.rgb.tif", "rotated"])
def test_box_lands_at_rasterio_coordinates(name, data_dir, rotated_raster):
    path = _raster(name, data_dir, rotated_raster)
    plan = plan_tiles(path, TileSpec(tile_size=200, overlap=0.1))
    tile = plan.tiles[min(3, len(plan.tiles) - 1)]
    answer = get_family("geochat", angle_convention="ccw").parse(
        "<p>plane</p>{<10><20><30><40>|<30>} <p>hangar</p>{<50><50><90><70>}", 200
    )
    placed = georeference(answer.detections, tile)
    assert [d.tile_id for d in placed] == [tile.tile_id] * 2
    assert all(d.frame == "raster" and d.crs == tile.crs for d in placed)
    with rasterio.open(path) as ds:
        to_map = ds.transform
    scale = plan.scale
    for tile_det, map_det in zip(answer.detections, placed):
        pixels = shapely.get_coordinates(tile_det.geometry)
        cols = tile.col_off + pixels[:, 0] * scale
        rows = tile.row_off + pixels[:, 1] * scale
        xs, ys = to_map @ (cols, rows)
        assert shapely.get_coordinates(map_det.geometry) == pytest.approx(
            np.column_stack([xs, ys]), abs=1e-6 * max(1.0, abs(to_map.c))
        )
    # the oriented box stays an exact rectangle of the same shape on the map
    obox = placed[0].geometry
    assert obox.area == pytest.approx(answer.detections[0].geometry.area * abs(to_map.determinant) * scale**2)


@pytest.mark.parametrize("name", ["RGB.byte.tif", "cogeo.tif", "rotated"])
def test_box_in_another_crs_matches_rasterio_warp(name, data_dir, rotated_raster):
    path = _raster(name, data_dir, rotated_raster)
    plan = plan_tiles(path, TileSpec(tile_size=200, overlap=0))
    tile = plan.tiles[0]
    (det,) = get_family("geochat").parse("{<25><25><75><75>}", 200).detections
    (placed,) = georeference([det], tile, "EPSG:4326")
    assert placed.frame == "crs" and placed.crs == "EPSG:4326"
    with rasterio.open(path) as ds:
        corner_x, corner_y = ds.transform @ (tile.col_off + 50 * plan.scale,
                                             tile.row_off + 50 * plan.scale)
        lon, lat = warp_transform(ds.crs, "EPSG:4326", [corner_x], [corner_y])
    distances = shapely.distance(shapely.points(shapely.get_coordinates(placed.geometry)),
                                 shapely.Point(lon[0], lat[0]))
    assert distances.min() < 1e-9


def test_map_region_in_another_crs_becomes_the_tile_box(data_dir):
    """A region drawn in EPSG:4326 over the UTM raster becomes GeoChat's box in the tile frame."""
    plan = plan_tiles(data_dir / "RGB.byte.tif", TileSpec(tile_size=100, overlap=0))
    tile = plan.tiles[5]
    inside = shapely.box(20, 30, 60, 50)  # tile pixels
    region_4326 = reproject_geometry(
        georeference(get_family("geochat").parse("{<20><30><60><50>}", 100).detections,
                     tile)[0].geometry, tile.crs, "EPSG:4326")
    back = map_to_tile(tile, reproject_geometry(region_4326, "EPSG:4326", tile.crs))
    assert back.hausdorff_distance(inside) < 1e-3
    prompt = get_family("geochat").build_prompt("identify", region=back, tile_size=100)
    assert prompt.endswith("{<20><30><60><50>|<0>}")
