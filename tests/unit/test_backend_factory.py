"""Building backends from (kind, model, settings): aliases, settings checks, catalog names."""
from __future__ import annotations

import json

import pytest

from geochat_qgis.core.backends.factory import (BackendSpec, create_backend, infer_kind,
                                                 normalise_kind, resolve_spec)
from geochat_qgis.core.backends.openai_http import OpenAIHttpBackend
from geochat_qgis.core.errors import BackendError, ModelError


def test_aliases_and_unknown_kinds():
    assert normalise_kind("llama_cpp") == normalise_kind("GGUF") == "llama.cpp"
    assert normalise_kind("hf") == "transformers"
    with pytest.raises(BackendError, match="Unknown backend 'onnx'.*llama.cpp, transformers"):
        normalise_kind("onnx")


def test_settings_are_checked_against_the_backend():
    backend = create_backend(BackendSpec("http", "geochat", settings={"base_url": "http://h/v1",
                                                                      "max_in_flight": 6}))
    assert isinstance(backend, OpenAIHttpBackend) and backend.batch_size == 6
    with pytest.raises(BackendError, match="Unknown setting.*n_ctx.*Known: .*base_url"):
        create_backend(BackendSpec("openai", "geochat", settings={"n_ctx": 4096}))


def test_spec_round_trips_through_json():
    spec = BackendSpec("llama.cpp", "/m/model.gguf", "geochat", "/m/mmproj.gguf", {"n_ctx": 4096})
    assert BackendSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_kind_from_what_the_model_is(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert infer_kind(str(tmp_path / "hf")) == "transformers"
    assert infer_kind("anything", server_url="http://127.0.0.1:8000/v1") == "openai"
    assert resolve_spec("geochat-7b", settings={"base_url": "http://h/v1"}).kind == "openai"


def test_catalog_names(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path))
    monkeypatch.setenv("GEOCHAT_USER_CATALOG", str(tmp_path / "none.json"))
    with pytest.raises(ModelError, match="not downloaded yet.*models download qwen2.5-vl-3b-gguf"):
        resolve_spec("qwen2.5-vl-3b-gguf")
    with pytest.raises(ModelError, match="convert it first"):
        resolve_spec("geochat-7b")
    with pytest.raises(ModelError, match="neither a model file or folder nor a model in the catalog"):
        resolve_spec("no-such-model")
    folder = tmp_path / "models" / "qwen2.5-vl-3b-gguf"
    folder.mkdir(parents=True)
    spec = resolve_spec("qwen2.5-vl-3b-gguf")
    assert (spec.kind, spec.family) == ("llama.cpp", "qwen2.5-vl")
    assert spec.model.endswith("Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf")
    assert spec.mmproj.endswith("mmproj-Qwen2.5-VL-3B-Instruct-Q8_0.gguf")
