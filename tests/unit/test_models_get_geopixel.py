"""Getting GeoPixel: the plan for the real 7B from the catalog alone (sizes, disk, memory, the
converted size without the adapters GeoPixel never runs), and ``get_model`` of a tiny GeoPixel
in the published layout served as MBZUAI/GeoPixel-7B by a hub on 127.0.0.1: the shards and
tokenizer downloaded (no code), converted once to safetensors, provenance, resume, then run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hub_repos import HUB_ENV_DROPPED, serve_repo_hub

from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.weights.catalog import BUILTIN_CATALOG, load_catalog
from geochat_qgis.core.weights.get import GetRefused, get_model
from geochat_qgis.core.weights.get_plan import plan_get
from geochat_qgis.core.weights.provenance import provenance_attributes
from geochat_qgis.core.weights.sizes import geopixel_dead_adapter_count

REPO = "MBZUAI/GeoPixel-7B"
# InternLM2-7B as GeoPixel-7B's config.json gives it
CONFIG_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "num_hidden_layers": 32, "torch_dtype": "bfloat16"}


@pytest.fixture
def catalog():
    return load_catalog(include_user=False)


def test_the_dead_adapters_are_2_4_billion_parameters_of_the_7b():
    # (256 + 256 + 512) x (in + out) of wqkv, wo, w1, w3, w2, in 32 layers
    assert geopixel_dead_adapter_count(CONFIG_7B) == 32 * 1024 * (10240 + 8192 + 3 * 18432)


def test_plan_for_the_real_7b_from_the_catalog(catalog, tmp_path):
    plan = plan_get("geopixel-7b", cache=tmp_path, catalog=catalog, online=False)
    assert (plan.target, plan.quant) == ("safetensors", None)
    assert len(plan.sources) == 1 and 22.6e9 < plan.sources[0].total_bytes < 22.8e9
    (choice,) = plan.choices
    assert 17.7e9 < choice.bytes < 18.1e9  # 22.7 GB less 4.8 GB of unused adapters
    assert plan.memory_needed == pytest.approx(10.0e9 + (2 << 30))  # largest shard + 2 GB
    assert plan.disk_needed == plan.download_bytes + plan.output_bytes
    assert plan.output_folder == str(tmp_path / "converted" / "geopixel-7b" / "safetensors")
    assert "geopixel" in choice.backends or "geopixel" in choice.not_here
    with pytest.raises(ModelError, match="converts to safetensors, not 'gguf'"):
        plan_get("geopixel-7b", "gguf", cache=tmp_path, catalog=catalog, online=False)
    with pytest.raises(ModelError, match="--quant applies to --to gguf only"):
        plan_get("geopixel-7b", "safetensors", "q8_0", cache=tmp_path, catalog=catalog,
                 online=False)


# ------------------------------------------------------------------ a tiny GeoPixel, got
@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    from geochat_qgis.core.models.geopixel.tiny import write_tiny_geopixel

    folder = tmp_path_factory.mktemp("repo") / "GeoPixel-7B"
    folder.mkdir()
    write_tiny_geopixel(folder, seed=0, seg_answer=True)
    (folder / "tokenization_internlm2.py").write_text("raise SystemExit('never run')\n")
    return folder


@pytest.fixture
def hub(tiny_repo, monkeypatch, tmp_path):
    for name in HUB_ENV_DROPPED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    server = next(generator := serve_repo_hub())
    server.add_folder(REPO, tiny_repo, commit="b" * 40)
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", server.url)
    yield server
    generator.close()


def tiny_catalog(tiny_repo, tmp_path):
    """The built-in entry with the tiny repository's own file list (its sizes from the hub)."""
    builtin = json.loads(BUILTIN_CATALOG.read_text())
    entry = next(e for e in builtin["models"] if e["name"] == "geopixel-7b")
    names = {f["path"] for f in entry["files"]}
    present = {p.name for p in tiny_repo.iterdir()}
    entry["files"] = [f for f in entry["files"] if f["path"] in present] + [
        {"path": n} for n in sorted(present - names) if n.endswith((".bin", ".json", ".model"))]
    user = tmp_path / "user.json"
    user.write_text(json.dumps({"models": [entry]}))
    return load_catalog(user)


def test_get_downloads_converts_once_and_runs(hub, tiny_repo, tmp_path):
    catalog = tiny_catalog(tiny_repo, tmp_path)
    seen = []
    model = get_model("geopixel-7b", cache=tmp_path / "cache", catalog=catalog,
                      on_progress=lambda *a: seen.append(a))
    assert {p[0] for p in seen} >= {"download", "convert", "verify"}
    assert not any(p.endswith(".py") for _, p, _ in hub.requests)  # no remote code fetched
    assert model.target == "safetensors" and "geopixel" in model.backends
    files = sorted(p.name for p in model.folder.iterdir())
    assert any(n.endswith(".safetensors") for n in files) and "provenance.json" in files
    assert not any(n.endswith(".bin") for n in files)
    from safetensors import safe_open

    for name in (n for n in files if n.endswith(".safetensors")):
        with safe_open(str(model.folder / name), "pt") as handle:
            assert not [k for k in handle.keys() if ".lora_" in k]  # no dead adapter kept
    attributes = provenance_attributes(model.model_path)
    assert attributes["model_src"] == REPO and attributes["model_rev"] == "b" * 40
    again = get_model("geopixel-7b", cache=tmp_path / "cache", catalog=catalog)
    assert again.folder == model.folder  # converted once
    from geochat_qgis.core.backends.base import Conversation, GenerateOptions
    from geochat_qgis.core.backends.factory import BackendSpec, create_backend

    tile = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    with create_backend(BackendSpec("geopixel", str(model.model_path), "geopixel")) as backend:
        out = backend.generate([tile], Conversation.single("Could you provide a segmentation "
                                                           "mask for the roof in this image?"),
                               GenerateOptions(max_new_tokens=12))[0]
    assert out.masks is not None and out.masks.shape[1:] == (300, 420)


def test_the_got_model_runs_by_its_catalog_name(hub, tiny_repo, tmp_path, monkeypatch,
                                                demo_raster):
    """``detect --model geopixel-7b`` finds the converted copy (not the pickle shards) and runs
    it with the geopixel backend, no --backend given."""
    catalog = tiny_catalog(tiny_repo, tmp_path)
    model = get_model("geopixel-7b", cache=tmp_path / "cache", catalog=catalog)
    monkeypatch.setenv("GEOCHAT_USER_CATALOG", str(tmp_path / "user.json"))
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "masks.geojson"
    from geochat_qgis.cli import main

    assert main(["detect", str(demo_raster), "--model", "geopixel-7b", "--task", "segment",
                 "--prompt", "roof", "--max-new-tokens", "8", "-o", str(out), "--quiet"]) == 0
    import pyogrio

    frame = pyogrio.read_dataframe(out)
    assert len(frame) >= 1 and set(frame["kind"]) == {"mask"}
    assert set(frame["model_src"]) == {REPO} and set(frame["model_rev"]) == {"b" * 40}
    assert set(frame["model_hash"]) == {model.provenance["model_hash"]}


def test_get_is_refused_before_any_download_when_the_disk_is_too_small(hub, tiny_repo,
                                                                       tmp_path, monkeypatch):
    from geochat_qgis.core.weights import get_plan

    catalog = tiny_catalog(tiny_repo, tmp_path)
    monkeypatch.setattr(get_plan, "disk_free", lambda folder: 1000)
    with pytest.raises(GetRefused, match="Not enough free disk space"):
        get_model("geopixel-7b", cache=tmp_path / "cache", catalog=catalog)
    # only config.json was read (a kilobyte, into memory, to size the output); nothing written
    assert [r[1].rsplit("/", 1)[-1] for r in hub.weight_requests()] in ([], ["config.json"])
    assert not (tmp_path / "cache").exists()
