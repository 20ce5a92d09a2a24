"""A llama.cpp-only runtime (torch and transformers unimportable in the child, as in the managed
llama.cpp runtime and on Python 3.13) gets GeoChat end to end: nothing to install for GGUF, the
.bin shards read with numpy, the converted model ready for llama.cpp and answering."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import rasterio

from geochat_qgis.client import RuntimeClient
from geochat_qgis.client.locate import PACKAGE_PARENT
from hub_repos import geochat_hub

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

# imported by the child's site.py before anything else: torch and transformers cannot be imported
BLOCKER = 'import sys\nsys.modules["torch"] = None\nsys.modules["transformers"] = None\n'


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from geochat_hub(tmp_path, monkeypatch)


@pytest.fixture
def client(tmp_path):
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    runtime = RuntimeClient(python=sys.executable,
                            env={"PYTHONPATH": f"{PACKAGE_PARENT}{os.pathsep}{blocker}"})
    try:
        yield runtime
    finally:
        runtime.close()


def test_a_llama_cpp_only_runtime_gets_and_runs_geochat(hub, client, demo_raster):
    backends = client.status()["backends"]
    assert backends["llama.cpp"] and not backends["transformers"] and not backends["geopixel"]

    plan = client.plan_get("geochat-7b", {"target": "gguf", "quant": "q4_k_m"})
    assert plan["ok"] and plan["problems"] == [] and plan["conversion_missing"] == []
    events = []
    got = client.get_model("geochat-7b", {"target": "gguf", "quant": "q4_k_m"}, events.append)
    assert {e.get("phase") for e in events} >= {"download", "convert", "quantize"}
    assert Path(got["model_path"]).is_file()
    ready = client.model_status({"model": {"name": "geochat-7b", "backend": "llama.cpp"}})
    assert ready["ready"] and ready["model"] == got["model_path"], ready

    with rasterio.open(demo_raster) as ds:
        left, top = ds.bounds.left, ds.bounds.top
    answer = client.ask({"raster": str(demo_raster), "task": "chat", "question": "what is here?",
                         "extent": [left, top - 200, left + 200, top], "tiling": {"overlap": 0},
                         "model": {"name": "geochat-7b", "backend": "llama.cpp", "n_threads": 1},
                         "options": {"max_new_tokens": 4}})
    assert answer.generated_tokens > 0 and answer.raw


def test_the_hf_checkpoint_names_transformers_and_its_installer(hub, client):
    plan = client.plan_get("geochat-7b", {"target": "hf"})
    assert not plan["ok"] and plan["conversion_missing"] == ["transformers"]
    assert "transformers backend" in " ".join(plan["problems"]) and "torch" not in " ".join(plan["problems"])
    assert all(path.endswith("config.json") for _, path, _ in hub.weight_requests())
