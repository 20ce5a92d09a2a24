"""The model catalog: the shipped catalog is complete and sane; user catalogs merge and validate."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from geochat_qgis.__about__ import MODELS_DIR
from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.weights.catalog import (
    add_user_entry, cache_root, load_catalog, parse_entry, read_catalog_file,
)

EXPECTED = {
    "geochat-7b": "MBZUAI/geochat-7B",
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "geopixel-7b": "MBZUAI/GeoPixel-7B",
    "geopixel-7b-res": "MBZUAI/GeoPixel-7B-RES",
    "qwen2.5-vl-3b-gguf": "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF",
    "qwen2.5-vl-7b-gguf": "ggml-org/Qwen2.5-VL-7B-Instruct-GGUF",
}


@pytest.fixture
def builtin():
    return load_catalog(include_user=False)


def test_builtin_catalog_lists_the_models_with_cards_and_sane_values(builtin):
    assert {e.name: e.repo for e in builtin} == EXPECTED
    for entry in builtin:
        assert (MODELS_DIR / entry.card).is_file(), entry.name
        assert entry.license and entry.min_ram_gb and entry.family
        for item in entry.files:
            assert item.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", item.sha256)
            assert item.expected_bytes > 0, item.path
    assert builtin.get("geochat-7b").convert["requires"] == ["clip-vit-large-patch14-336"]
    assert builtin.get("geochat-7b").backends == ()  # nothing runs it unconverted
    for name in ("qwen2.5-vl-3b-gguf", "qwen2.5-vl-7b-gguf"):
        entry = builtin.get(name)
        assert entry.file("model").path.endswith(".gguf")
        assert entry.file("mmproj").path.startswith("mmproj-")
        assert entry.backends == ("llama.cpp",)
    for name in ("geopixel-7b", "geopixel-7b-res"):  # the shards, converted once; no code
        entry = builtin.get(name)
        assert not entry.snapshot and entry.convert["to"] == ["safetensors"] and entry.min_ram_gb
        paths = [f.path for f in entry.files]
        assert "pytorch_model.bin.index.json" in paths and "tokenizer.model" in paths
        assert sum(p.endswith(".bin") for p in paths) == 3
        assert not any(p.endswith(".py") for p in paths)  # no remote code is fetched or run
        assert 22.5e9 < entry.total_bytes < 22.9e9


def test_unknown_name_lists_known_models(builtin):
    with pytest.raises(ModelError, match="Unknown model 'nope'.*geochat-7b"):
        builtin.get("nope")


def test_user_catalog_adds_local_and_repo_entries_and_overrides(tmp_path: Path):
    weights = tmp_path / "mine"
    weights.mkdir()
    user = tmp_path / "user.json"
    user.write_text(json.dumps({"models": [
        {"name": "my-geochat", "family": "geochat", "path": "mine",
         "files": [{"path": "m.gguf", "role": "model"}, {"path": "p.gguf", "role": "mmproj"}]},
        {"name": "qwen2.5-vl-7b-gguf", "family": "qwen2.5-vl", "repo": "me/fork",
         "files": ["a.gguf"]},
    ]}))
    catalog = load_catalog(user)
    mine = catalog.get("my-geochat")
    assert mine.is_local and mine.local_dir() == weights  # relative to the catalog file
    assert mine.path_of("mmproj") == weights / "p.gguf"
    assert catalog.get("qwen2.5-vl-7b-gguf").repo == "me/fork"
    assert len(catalog) == len(EXPECTED) + 1


@pytest.mark.parametrize("raw, message", [
    ({"name": "x", "repo": "a/b", "files": ["f"]}, "'family' is required"),
    ({"name": "x", "family": "f", "repo": "a/b", "path": "/p", "files": ["f"]}, "exactly one"),
    ({"name": "x", "family": "f", "repo": "a/b", "files": ["../../etc/passwd"]}, "without '..'"),
    ({"name": "x", "family": "f", "repo": "a/b", "files": ["/abs"]}, "must be relative"),
    ({"name": "x", "family": "f", "repo": "a/b",
      "files": [{"path": "f", "sha256": "abc"}]}, "64 hex"),
    ({"name": "bad name", "family": "f", "repo": "a/b", "files": ["f"]}, "'name' must be"),
    ({"name": "x", "family": "f", "repo": "a/b"}, "list its 'files'"),
])
def test_malformed_entries_are_refused_with_the_reason(raw, message):
    with pytest.raises(ModelError, match=message):
        parse_entry(raw, "test")


def test_broken_user_catalog_file_names_the_file(tmp_path: Path):
    user = tmp_path / "user.json"
    user.write_text("{not json")
    with pytest.raises(ModelError, match="user.json is not readable JSON"):
        load_catalog(user)
    user.write_text(json.dumps({"entries": []}))
    with pytest.raises(ModelError, match="'models' list"):
        read_catalog_file(user)


def test_add_user_entry_writes_and_replaces(tmp_path: Path):
    user = tmp_path / "cfg" / "catalog.json"
    add_user_entry({"name": "a", "family": "geochat", "repo": "o/a", "files": ["x.gguf"]}, user)
    add_user_entry({"name": "a", "family": "geochat", "repo": "o/b", "files": ["x.gguf"]}, user)
    add_user_entry({"name": "b", "family": "qwen2.5-vl", "path": "/d", "files": ["y.gguf"]}, user)
    entries = read_catalog_file(user)
    assert [(e.name, e.repo) for e in entries] == [("a", "o/b"), ("b", None)]
    with pytest.raises(ModelError):
        add_user_entry({"name": "c", "repo": "o/c", "files": ["z"]}, user)
    assert len(read_catalog_file(user)) == 2  # a refused entry leaves the file as it was


def test_cache_root_setting_beats_environment_beats_default(tmp_path, monkeypatch):
    monkeypatch.delenv("GEOCHAT_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "geochat-qgis"
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "setting") == tmp_path / "setting"
    entry = load_catalog(include_user=False).get("geochat-7b")
    assert entry.local_dir() == tmp_path / "env" / "models" / "geochat-7b"
