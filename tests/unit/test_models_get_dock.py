"""What the dock asks about models, through the runtime: the model list (GeoChat-7B with what
getting it takes), the get plan, deleting the sources; and gui/model_choice.py, which reads the
catalog with json and imports nothing of the core."""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_repos import geochat_hub

from geochat_qgis.client import RuntimeClient, RuntimeClientError
from geochat_qgis.gui import model_choice
from geochat_qgis.core.weights.demo import (DEMO_GEOPIXEL_NAME, DEMO_GEOPIXEL_NOTE,
                                            DEMO_GEOPIXEL_TITLE, DEMO_NAME, DEMO_NOTE)

MODEL_CHOICE = Path(model_choice.__file__)


def settings(**changes):
    base = dict(backend="llama.cpp", server_url="http://127.0.0.1:9/v1", server_model="",
                cache_dir="", mmproj="", threads=0, gpu_layers=-1, device="auto")
    return SimpleNamespace(**{**base, **changes})


def test_model_choice_imports_only_stdlib_and_the_client():
    tree = ast.parse(MODEL_CHOICE.read_text(encoding="utf-8"))
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    absolute |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and not n.level}
    assert relative <= {"__about__", "client"}
    assert absolute <= set(sys.stdlib_module_names)
    assert (model_choice.DEMO_NAME, model_choice.DEMO_NOTE) == (DEMO_NAME, DEMO_NOTE)
    assert (model_choice.DEMO_GEOPIXEL_NAME, model_choice.DEMO_GEOPIXEL_TITLE,
            model_choice.DEMO_GEOPIXEL_NOTE) == (DEMO_GEOPIXEL_NAME, DEMO_GEOPIXEL_TITLE,
                                                 DEMO_GEOPIXEL_NOTE)


def test_catalog_rows_list_geochat_7b_before_any_runtime(monkeypatch, tmp_path):
    monkeypatch.setenv("GEOCHAT_USER_CATALOG", str(tmp_path / "none.json"))
    model_choice.remember_rows([])
    choices = {c.key: c for c in model_choice.model_choices()}
    assert list(choices)[0] == DEMO_NAME
    assert choices["geochat-7b"].needs_get and choices["geochat-7b"].catalog
    assert "qwen2.5-vl-3b-gguf" in choices and "clip-vit-large-patch14-336" not in choices
    assert model_choice.model_status("geochat-7b", settings())[0] == model_choice.CHECKING
    assert model_choice.model_status("nope", settings())[0] == model_choice.NOT_FOUND
    assert model_choice.model_status(DEMO_NAME, settings())[0] == model_choice.READY
    model_choice.remember_rows([{"name": "other", "status": "ready"}])  # listed without it
    assert model_choice.model_status("geochat-7b", settings())[0] == model_choice.NOT_FOUND
    model_choice.remember_rows(model_choice.catalog_rows())  # no runtime: the catalog's rows
    status, sentence = model_choice.model_status("geochat-7b", settings())
    assert status == model_choice.MISSING and "download 15.8 GB" in sentence, sentence
    model_choice.remember_rows([])


def test_a_broken_user_catalog_keeps_the_builtin_list(monkeypatch, tmp_path):
    broken = tmp_path / "catalog.json"
    broken.write_text("{not json", encoding="utf-8")
    monkeypatch.setenv("GEOCHAT_USER_CATALOG", str(broken))
    assert "geochat-7b" in {r["name"] for r in model_choice.catalog_rows()}


def test_model_request_for_each_kind_of_choice(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_choice.model_request(DEMO_NAME, settings(threads=2)) == {
        "backend": "llama.cpp", "name": DEMO_NAME, "n_threads": 2}
    assert model_choice.model_request("geochat-7b", settings(backend="transformers", device="cpu",
                                                             cache_dir="/c")) == {
        "backend": "transformers", "name": "geochat-7b", "device": "cpu", "cache_dir": "/c"}
    assert model_choice.model_request(str(gguf), settings())["model_path"] == str(gguf)
    server = model_choice.model_request("geochat-7b", settings(backend="openai"), api_key="k")
    assert server == {"backend": "openai", "server_url": "http://127.0.0.1:9/v1",
                      "server_model": "geochat-7b", "name": "geochat-7b", "api_key": "k"}


def test_geopixel_choices_run_with_the_geopixel_backend_whatever_the_docks(monkeypatch, tmp_path):
    monkeypatch.setenv("GEOCHAT_USER_CATALOG", str(tmp_path / "none.json"))
    model_choice.remember_rows([])
    choices = [c.key for c in model_choice.model_choices()]
    assert choices[:2] == [DEMO_NAME, DEMO_GEOPIXEL_NAME]  # both demos first, no download
    assert {"geopixel-7b", "geopixel-7b-res"} <= set(choices)
    for backend in ("llama.cpp", "transformers", "openai"):
        assert model_choice.model_request(DEMO_GEOPIXEL_NAME, settings(backend=backend)) == {
            "backend": "geopixel", "name": DEMO_GEOPIXEL_NAME}
        got = model_choice.model_request("geopixel-7b", settings(backend=backend, device="cpu"))
        assert got == {"backend": "geopixel", "name": "geopixel-7b", "device": "cpu"}
    folder = tmp_path / "my-geopixel"  # a folder picked with "Model file or folder..."
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["InternLMXComposer2ForCausalLM"]}')
    assert model_choice.model_request(str(folder), settings())["backend"] == "geopixel"
    (folder / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    assert model_choice.model_request(str(folder), settings())["backend"] == "llama.cpp"
    # GeoPixel runs on the CPU: no "needs a GPU"; without torch the runtime's row says why
    status, sentence = model_choice.model_status(DEMO_GEOPIXEL_NAME, settings())
    assert (status, sentence) == (model_choice.READY, DEMO_GEOPIXEL_NOTE)
    row = {"name": DEMO_GEOPIXEL_NAME, "family": "geopixel", "status": "ready",
           "choices": [{"target": "download", "backends": [],
                        "not_here": {"geopixel": "not installed (torch missing)"}}]}
    status, sentence = model_choice.model_status(DEMO_GEOPIXEL_NAME, settings(), row)
    assert status == model_choice.NO_BACKEND and "torch missing" in sentence
    row = {"name": "geopixel-7b", "family": "geopixel", "status": "missing",
           "needs_conversion": True, "download_bytes": 22.7e9,
           "choices": [{"target": "safetensors", "quant": None, "bytes": 17.9e9,
                        "backends": ["geopixel"], "not_here": {}}]}
    status, sentence = model_choice.model_status("geopixel-7b", settings(), row)
    assert status == model_choice.MISSING and "safetensors 17.9 GB" in sentence, sentence


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from geochat_hub(tmp_path, monkeypatch)


@pytest.mark.slow
def test_list_plan_get_and_delete_sources_through_the_runtime(hub, tmp_path):
    pytest.importorskip("llama_cpp")
    client = RuntimeClient(python=sys.executable)
    try:
        rows = model_choice.fetch_rows(client)
        assert rows[0]["name"] == DEMO_NAME
        geochat = next(r for r in rows if r["name"] == "geochat-7b")
        assert geochat["status"] == "missing" and geochat["needs_conversion"]
        assert geochat["requires"] == ["clip-vit-large-patch14-336"]
        assert {(c["target"], c["quant"]) for c in geochat["choices"]} == {
            ("gguf", "q4_k_m"), ("gguf", "q8_0"), ("gguf", "f16"), ("hf", None)}
        assert "llama.cpp" in next(c for c in geochat["choices"] if c["target"] == "gguf")["backends"]
        status, sentence = model_choice.model_status("geochat-7b", settings())
        assert status == model_choice.MISSING and "gguf q4_k_m" in sentence and "GB" in sentence
        listed = {c.key: c for c in model_choice.model_choices()}
        assert listed["geochat-7b"].needs_get
        assert listed["geochat-7b"].note.startswith("runs here with llama.cpp")
        assert "getting it: download" in listed["geochat-7b"].note

        plan = client.plan_get("geochat-7b", {"target": "gguf", "quant": "f16"})
        assert plan["ok"] and plan["problems"] == []
        assert plan["download_bytes"] == sum(s["total_bytes"] for s in plan["sources"]) > 0
        assert plan["disk_free"] > plan["disk_needed"] > plan["download_bytes"]
        assert plan["memory_needed"] > 1 << 30  # largest shard + 1 GB
        with pytest.raises(RuntimeClientError, match="q9"):
            client.plan_get("geochat-7b", {"target": "gguf", "quant": "q9"})
        with pytest.raises(RuntimeClientError, match="Get it first"):
            client.delete_sources("geochat-7b")

        got = client.get_model("geochat-7b", {"target": "gguf", "quant": "f16"})
        model_choice.fetch_rows(client)
        status, sentence = model_choice.model_status("geochat-7b", settings())
        assert status == model_choice.READY and "llama.cpp" in sentence
        # the dock's request names no target: the copy got is found for llama.cpp
        ready = client.model_status({"model": model_choice.model_request("geochat-7b", settings())})
        assert ready["ready"] and ready["model"] == got["model_path"]

        offer = client.delete_sources("geochat-7b", dry_run=True)
        assert offer["bytes"] > 0 and not offer["deleted"]
        assert all(Path(f).is_dir() for f in offer["folders"])
        done = client.delete_sources("geochat-7b")
        assert done["deleted"] and not any(Path(f).exists() for f in done["folders"])
        assert Path(got["model_path"]).is_file()
    finally:
        client.close()


def test_check_server_says_unreachable(tmp_path):
    client = RuntimeClient(python=sys.executable)
    try:
        status, sentence = model_choice.check_server(client, "geochat", settings(backend="openai"))
        assert status == model_choice.UNREACHABLE and "127.0.0.1:9" in sentence
    finally:
        client.close()


def test_qgis_proxy_is_applied_to_the_child_and_taken_back(monkeypatch):
    from geochat_qgis.core.weights.proxy import apply_proxy
    from geochat_qgis.core.weights.download import DownloadError

    monkeypatch.setenv("HTTPS_PROXY", "http://system:8080")
    monkeypatch.delenv("NO_PROXY", raising=False)
    apply_proxy({"proxy": {"enabled": True, "type": "HttpProxy", "host": "proxy.corp",
                           "port": "3128", "user": "ana", "excluded": ["https://mirror.corp/x"]}})
    assert os.environ["HTTPS_PROXY"] == "http://ana@proxy.corp:3128"
    assert os.environ["NO_PROXY"].endswith("mirror.corp")
    apply_proxy({"proxy": None})  # the proxy switched off in QGIS: the environment's own again
    assert os.environ["HTTPS_PROXY"] == "http://system:8080" and "NO_PROXY" not in os.environ
    with pytest.raises(DownloadError, match="HTTP proxy"):
        apply_proxy({"proxy": {"enabled": True, "type": "Socks5Proxy", "host": "s", "port": 1080}})


def test_a_runtime_without_what_converting_needs_is_told_before_any_download(hub, tmp_path, monkeypatch):
    from geochat_qgis.core.runtime.model_ops import plan_get

    monkeypatch.setitem(sys.modules, "torch", None)  # as in the managed llama.cpp runtime:
    plan = plan_get({"model": "geochat-7b", "options": {"target": "gguf", "quant": "q4_k_m"}})
    assert plan["ok"] and not plan["conversion_missing"]  # GeoChat converts without torch
    monkeypatch.setitem(sys.modules, "gguf", None)  # a runtime without the llama.cpp packages
    plan = plan_get({"model": "geochat-7b", "options": {"target": "gguf", "quant": "q4_k_m"}})
    assert not plan["ok"] and list(plan["conversion_missing"]) == ["gguf"]
    assert "Converting needs gguf" in plan["message"] and "llama.cpp backend" in plan["message"]
    assert all(p.endswith("config.json") for _, p, _ in hub.weight_requests())
