"""Getting a model through the runtime: download + convert in the child (core/weights'
get_model) against a hub on 127.0.0.1 serving tiny repositories, progress events, then a run
with what it made; and model_status before and after."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hub_repos import geochat_hub

from geochat_qgis.client import RuntimeClient, RuntimeClientError

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from geochat_hub(tmp_path, monkeypatch)


def test_get_model_downloads_converts_and_runs(hub, tmp_path, demo_raster):
    client = RuntimeClient(python=sys.executable)  # the child inherits the hub's settings
    try:
        request = {"raster": str(demo_raster), "task": "refer", "prompts": ["car"],
                   "model": {"name": "geochat-7b"}}
        before = client.model_status(request)
        assert before["ready"] is False and "models get geochat-7b" in before["message"]
        events: list[dict] = []
        got = client.get_model("geochat-7b", {"target": "gguf", "quant": "f16"}, events.append)
        phases = [e["phase"] for e in events]
        assert "download" in phases and "convert" in phases
        downloads = [e for e in events if e["phase"] == "download"]
        assert downloads[-1]["done"] == downloads[-1]["total"] > 0
        assert Path(got["model_path"]).is_file() and Path(got["mmproj_path"]).is_file()
        assert got["target"] == "gguf" and got["quant"] == "f16"
        with pytest.raises(RuntimeClientError, match="not in the catalog|unknown|no-such"):
            client.get_model("no-such-model")
        chosen = {**request, "model": {"name": "geochat-7b", "target": "gguf", "quant": "f16"}}
        after = client.model_status(chosen)
        assert after["ready"] is True and after["model"] == got["model_path"]
        assert after["kind"] == "llama.cpp" and after["family"] == "geochat"
        ran = client.run({**chosen,
                          "extent": None, "tiling": {"tile_size": 504, "overlap": 0},
                          "options": {"max_new_tokens": 4},
                          "output": {"path": str(tmp_path / "got.gpkg")}})
        assert ran.complete and ran.tiles_done == ran.tiles_planned > 0
    finally:
        client.close()
