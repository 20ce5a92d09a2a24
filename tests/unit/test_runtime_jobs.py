"""core/jobs.py: one resolution of the user's choices for every front end (CLI, runtime server
for the dock and Processing)."""
from __future__ import annotations

import pytest
import shapely
from shapely.geometry import box

from geochat_qgis.cli import build_parser
from geochat_qgis.cli.detect import job_request
from geochat_qgis.core.errors import GeoChatError
from geochat_qgis.core.jobs import backend_spec, build_chat, build_job
from geochat_qgis.core.runtime.job_ops import plan
from geochat_qgis.core.tile_types import GEOCHAT_PAD_RGB
from geochat_qgis.core.tiling import plan_tiles

HTTP = {"backend": "openai", "server_url": "http://127.0.0.1:9/v1", "server_model": "m"}


def cli_job(*argv: str):
    return build_job(job_request(build_parser().parse_args(list(argv))))


def test_geopixel_gets_its_own_tiles_from_every_front_end(tmp_path, demo_raster):
    weights = tmp_path / "geopixel"
    weights.mkdir()
    request = {"raster": str(demo_raster), "task": "segment", "prompts": ["roof"],
               "model": {"backend": "geopixel", "model_path": str(weights)}}
    job = build_job(request)  # the dock's and Processing's path (through the runtime)
    assert job.family == "geopixel" and job.backend.kind == "geopixel"
    assert job.tile_spec.tile_size == 1680 and job.tile_spec.pad_rgb == (255, 255, 255)
    cli = cli_job("detect", str(demo_raster), "--model", str(weights), "--backend", "geopixel",
                  "--task", "segment", "--prompt", "roof", "-o", str(tmp_path / "o.gpkg"))
    assert cli.tile_spec == job.tile_spec and cli.family == "geopixel"
    planned = plan(request, None)
    assert planned["tile_size"] == 1680 and planned["family"] == "geopixel"
    # a tile size of None or 0 (the dock's "model default") is the family's too
    for size in (None, 0):
        sized = build_job({**request, "tiling": {"tile_size": size}})
        assert sized.tile_spec.tile_size == 1680
    # the user's own size is kept, with the family's pad colour
    own = build_job({**request, "tiling": {"tile_size": 504}})
    assert own.tile_spec.tile_size == 504 and own.tile_spec.pad_rgb == (255, 255, 255)


def test_geochat_defaults_and_the_cli_agree(tmp_path, demo_raster):
    request = {"raster": str(demo_raster), "task": "refer", "prompts": ["car"],
               "model": dict(HTTP, server_model="geochat-7b")}
    job = build_job(request)
    assert job.family == "geochat" and job.tile_spec.tile_size == 504
    assert job.tile_spec.pad_rgb == GEOCHAT_PAD_RGB and job.tile_spec.overlap == 0.1
    cli = cli_job("detect", str(demo_raster), "--model", "geochat-7b", "--server-url",
                  HTTP["server_url"], "--prompt", "car", "-o", str(tmp_path / "o.gpkg"))
    assert cli.tile_spec == job.tile_spec and cli.backend.kind == "openai"
    assert cli.backend.settings["base_url"] == HTTP["server_url"]


def test_backend_settings_follow_the_backend(tiny_gguf):
    spec = backend_spec({"model": {"model_path": str(tiny_gguf), "n_threads": 2,
                                   "n_gpu_layers": 0, "device": "cuda", "server_url": None}})
    assert spec.kind == "llama.cpp" and spec.settings == {"n_threads": 2, "n_gpu_layers": 0}
    http = backend_spec({"model": {**HTTP, "api_key": "k", "n_threads": 4}})
    assert http.settings == {"base_url": HTTP["server_url"], "api_key": "k"}
    assert http.model == "m" and http.family == "geochat"


def test_area_wkt_and_crs_become_what_plan_tiles_takes(demo_raster):
    raster_plan = plan_tiles(demo_raster)
    bounds = raster_plan.area.bounds
    corner = box(bounds[0], bounds[1], bounds[0] + 400, bounds[1] + 400)
    job = build_job({"raster": str(demo_raster), "prompts": ["car"], "model": HTTP,
                     "aoi_wkt": [corner.wkt], "aoi_crs": "EPSG:3857",
                     "extent": list(bounds), "extent_crs": "EPSG:3857"})
    assert shapely.equals(job.aoi, corner) and job.extent_crs == "EPSG:3857"
    in_degrees = build_job({"raster": str(demo_raster), "prompts": ["car"], "model": HTTP,
                            "aoi_wkt": [corner.wkt], "aoi_crs": "EPSG:3857",
                            "extent": [-180, -85, 180, 85], "extent_crs": "EPSG:4326"})
    assert in_degrees.aoi.bounds[0] > -180 and in_degrees.aoi.bounds[2] < 180  # reprojected
    assert len(plan_tiles(demo_raster, job.tile_spec, job.extent, job.extent_crs, job.aoi)) \
        == len(plan_tiles(demo_raster, in_degrees.tile_spec, in_degrees.extent,
                          in_degrees.extent_crs, in_degrees.aoi))


def test_questions_get_one_overview_tile_and_chat_requests(demo_raster):
    request = {"raster": str(demo_raster), "task": "identify", "question": "",
               "model": HTTP, "region_wkt": "POLYGON ((0 0, 1 0, 1 1, 0 0))",
               "region_crs": "EPSG:3857", "history": [["q", "a"]], "classes": "a, b",
               "output": {"crs": "EPSG:4326"}, "options": {"max_new_tokens": 9}}
    chat = build_chat(request)
    assert chat.task == "identify" and chat.history == [("q", "a")]
    assert chat.classes == ["a", "b"] and chat.region.area == 0.5
    assert chat.output_crs == "EPSG:4326" and chat.max_new_tokens == 9
    assert chat.tile_spec.overlap == 0 and chat.tile_spec.tile_size == 504
    job = build_job({**request, "task": "chat", "question": "what?"})
    assert job.prompts == ["what?"] and len(plan_tiles(
        demo_raster, job.tile_spec, job.extent, job.extent_crs)) == 1


def test_a_malformed_history_is_named_not_a_traceback(demo_raster):
    request = {"raster": str(demo_raster), "task": "chat", "question": "and now?", "model": HTTP}
    for history, said in ((["q"], "item 1"), ([["q", "a"], ["q2"]], "item 2"),
                          ([["q", None]], "item 1"), ("q: a", "list of")):
        with pytest.raises(GeoChatError, match=said):
            build_chat({**request, "history": history})
    assert build_chat({**request, "history": []}).history == []
