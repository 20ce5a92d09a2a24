"""A job and a question over the pipe with the tiny GeoChat GGUF (llama.cpp in the child) give
what the core gives in this process."""
from __future__ import annotations

import sys

import pytest
import rasterio
from test_client import features

from geochat_qgis.client import RuntimeClient
from geochat_qgis.core.backends.factory import create_backend
from geochat_qgis.core.chat import ask
from geochat_qgis.core.export import export_detections
from geochat_qgis.core.jobs import backend_spec, build_chat, build_job
from geochat_qgis.core.pipeline import run_job

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    runtime = RuntimeClient(python=sys.executable)
    yield runtime
    runtime.close()


def tiny_request(tiny_gguf, raster, **changes) -> dict:
    with rasterio.open(raster) as ds:
        left, top = ds.bounds.left, ds.bounds.top
    request = {
        "raster": str(raster), "task": "refer", "prompts": ["car"],
        "extent": [left, top - 500, left + 500, top],  # 2 x 2 tiles of 504 px
        "model": {"model_path": str(tiny_gguf), "n_threads": 1},
        "tiling": {"overlap": 0}, "options": {"max_new_tokens": 24, "grammar": True},
    }
    request.update(changes)
    return request


def test_run_writes_what_run_job_finds_in_process(client, tiny_gguf, demo_raster, tmp_path):
    request = tiny_request(tiny_gguf, demo_raster, output={"path": str(tmp_path / "pipe.gpkg")})
    events: list[dict] = []
    remote = client.run(request, events.append)
    job = build_job(request)
    with create_backend(job.backend) as backend:
        local = run_job(job, backend)
    assert remote.complete and remote.tiles_done == local.tiles_done == 4
    assert remote.features == len(local.detections) > 0  # the grammar forces boxes
    here = export_detections(local.detections, tmp_path / "here.gpkg", local.crs)
    assert features(remote.output) == features(here)
    assert [a["raw"] for a in remote.answers] == [a.raw for a in local.answers]
    tokens = "".join(e["text"] for e in events if e["type"] == "token")
    assert tokens == "".join(a.raw for a in local.answers)
    assert [e["done"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4]


def test_ask_answers_as_the_core_does(client, tiny_gguf, demo_raster, tmp_path):
    request = tiny_request(tiny_gguf, demo_raster, task="chat", question="what is here?",
                           options={"max_new_tokens": 12})
    tokens: list[str] = []
    remote = client.ask(request, lambda e: tokens.append(e["text"]))
    spec = backend_spec(request)
    with create_backend(spec) as backend:
        local = ask(build_chat(request, spec), backend)
    assert remote.raw == local.answer.raw and remote.text == local.answer.text
    assert remote.user_text == local.user_text and remote.how == local.how
    assert remote.generated_tokens == local.generated_tokens > 0
    assert "".join(tokens).strip() == remote.raw.strip()
