"""core.chat: one question about an extent, through the real llama.cpp backend and tiny GGUF."""
from __future__ import annotations

import re

import pytest
import rasterio
from shapely.geometry import box

from geochat_qgis.core.backends.factory import create_backend, resolve_spec
from geochat_qgis.core.chat import ChatRequest, as_history, ask, overview_plan, region_extent
from geochat_qgis.core.errors import GeoChatError
from geochat_qgis.core.tiling import TileSpec


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    backend = create_backend(resolve_spec(str(tiny_gguf)))
    yield backend
    backend.close()


def test_overview_of_a_large_extent_is_one_downsampled_tile(demo_raster):
    plan, how = overview_plan(str(demo_raster), TileSpec(tile_size=504))
    assert len(plan) == 1
    assert "downsampled" in how and "1024 x 1024 px" in how
    assert plan.scale == pytest.approx(1024 / 504, rel=0.01)


def test_small_extent_fits_one_native_tile(demo_raster):
    with rasterio.open(demo_raster) as ds:
        left, top = ds.bounds.left, ds.bounds.top
        res = ds.res[0]
    extent = (left, top - 300 * res, left + 300 * res, top)
    plan, how = overview_plan(str(demo_raster), TileSpec(tile_size=504), extent)
    assert len(plan) == 1 and plan.scale == 1.0
    # ground metres: Web Mercator's 0.597 m units shrink by cos(latitude)
    assert how == f"one 504 px tile at {plan.native_gsd_m:.3g} m per pixel"
    assert plan.native_gsd_m == pytest.approx(0.472, abs=0.01)


def test_ask_streams_and_keeps_history(backend, demo_raster):
    pieces: list[str] = []
    request = ChatRequest(str(demo_raster), "what is in this image?", max_new_tokens=8)
    first = ask(request, backend, on_token=lambda i, piece: pieces.append(piece))
    assert first.generated_tokens >= 1
    assert "".join(pieces).strip() == first.answer.raw.strip()
    assert first.user_text == "what is in this image?"
    follow = ChatRequest(str(demo_raster), "and the road?", history=as_history([first]),
                         max_new_tokens=4)
    second = ask(follow, backend)
    # the second prompt holds the first turn: more prompt tokens than the first had
    assert second.prompt_tokens > first.prompt_tokens
    # the same extent, model and history: the follow-up continues from the first turn (issue 16)
    assert second.evaluated_tokens < 0.1 * first.evaluated_tokens
    backend.evaluator.forget()
    fresh = ask(follow, backend)
    assert fresh.evaluated_tokens == fresh.prompt_tokens
    assert fresh.answer.raw == second.answer.raw


def test_identify_region_becomes_a_box_in_the_tile_frame(backend, demo_raster):
    with rasterio.open(demo_raster) as ds:
        left, top, res = ds.bounds.left, ds.bounds.top, ds.res[0]
    region = box(left + 100 * res, top - 200 * res, left + 160 * res, top - 100 * res)
    request = ChatRequest(str(demo_raster), "", task="identify", region=region,
                          region_crs="EPSG:3857", max_new_tokens=4)
    reply = ask(request, backend)
    assert reply.user_text.startswith("[identify] What is the object present at {<")
    # the box is the region's place in the tile the model saw, in GeoChat's 0-100 frame
    numbers = [int(n) for n in re.findall(r"<(-?\d+)>", reply.user_text)]
    tile = reply.tile
    col0 = (region.bounds[0] - tile.transform.c) / tile.transform.a
    row0 = (region.bounds[3] - tile.transform.f) / tile.transform.e
    assert numbers[0] == pytest.approx(col0 / 504 * 100, abs=1)
    assert numbers[1] == pytest.approx(row0 / 504 * 100, abs=1)
    assert numbers[2] - numbers[0] == pytest.approx(60 / 504 * 100, abs=1.5)
    assert numbers[3] - numbers[1] == pytest.approx(100 / 504 * 100, abs=1.5)
    assert region_extent(region)[0] == pytest.approx(left + 70 * res)


def test_identify_without_a_region_says_what_to_do(backend, demo_raster):
    with pytest.raises(GeoChatError, match="draw one on the map"):
        ask(ChatRequest(str(demo_raster), "", task="identify"), backend)
