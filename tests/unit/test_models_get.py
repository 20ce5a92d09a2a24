"""``get_model``: download + convert GeoChat-7B against a hub on 127.0.0.1 serving tiny
repositories laid out as MBZUAI/geochat-7B and openai/clip-vit-large-patch14-336."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import json
import shutil

import numpy as np
import pytest
from hub_repos import CLIP_REPO, GEOCHAT_REPO, serve_repo_hub, tiny_geochat_repos

from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions
from geochat_qgis.core.errors import Cancelled
from geochat_qgis.core.weights.catalog import BUILTIN_CATALOG, load_catalog
from geochat_qgis.core.weights.download import DownloadError
from geochat_qgis.core.weights.get import delete_sources, get_model, source_cleanup
from geochat_qgis.core.weights.get_plan import plan_get
from geochat_qgis.core.weights.provenance import PROVENANCE_FIELDS, provenance_attributes

pytestmark = pytest.mark.slow
SHARD_2 = "pytorch_model-00002-of-00002.bin"


def needs_llama():
    """Quantising and running a GGUF take llama.cpp."""
    pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return tiny_geochat_repos(tmp_path_factory.mktemp("repos"))


@pytest.fixture
def hub(repos, monkeypatch, tmp_path):
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY",
                 "http_proxy", "https_proxy", "GEOCHAT_USER_CATALOG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty HF cache
    server = next(generator := serve_repo_hub())
    server.add_folder(GEOCHAT_REPO, repos[0], commit="a" * 40)
    server.add_folder(CLIP_REPO, repos[1], commit="c" * 40)
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", server.url)
    yield server
    generator.close()


@pytest.fixture
def catalog():
    return load_catalog(include_user=False)


def _answers(model_path, mmproj_path) -> str:
    from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend

    tile = np.random.default_rng(3).integers(0, 256, (504, 504, 3), dtype=np.uint8)
    with LlamaCppBackend(model_path, mmproj=mmproj_path) as backend:
        result = backend.generate([tile], Conversation.single("[refer] Give me the location of "
                                                              "<p> car </p>"),
                                  GenerateOptions(max_new_tokens=6))[0]
    assert result.generated_tokens > 0
    return result.text


def test_plan_states_downloads_sizes_disk_and_memory_before_anything(hub, catalog, tmp_path):
    plan = plan_get("geochat-7b", "gguf", "q4_k_m", tmp_path / "cache", catalog=catalog)
    sizes = {s.repo: s for s in plan.sources}
    geochat_bytes = sum(len(d) for d in hub.repos[GEOCHAT_REPO].files.values())
    assert sizes[GEOCHAT_REPO].total_bytes == geochat_bytes == sizes[GEOCHAT_REPO].fetch_bytes
    assert sizes[GEOCHAT_REPO].commit == "a" * 40 and sizes[CLIP_REPO].commit == "c" * 40
    assert {(c.target, c.quant) for c in plan.choices} == {
        ("gguf", "q4_k_m"), ("gguf", "q8_0"), ("gguf", "f16"), ("hf", None)}
    by_choice = {(c.target, c.quant): c for c in plan.choices}
    assert 0 < by_choice["gguf", "q4_k_m"].bytes < by_choice["gguf", "q8_0"].bytes
    assert by_choice["gguf", "q4_k_m"].temp_bytes > 0 and by_choice["gguf", "f16"].temp_bytes == 0
    assert plan.disk_needed == plan.download_bytes + plan.output_bytes + plan.temp_bytes
    largest = max(len(d) for d in hub.repos[GEOCHAT_REPO].files.values())
    assert plan.memory_needed == largest + (1 << 30)  # numpy maps the shard: + 1 GB
    assert plan.installed is None and plan.memory_available > 0
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    assert ("llama.cpp" in by_choice["gguf", "q4_k_m"].backends) == has_llama
    # quantising needs llama.cpp: without it the plan says so before any download
    assert plan.ok == has_llama
    assert has_llama or "llama-cpp-python" in " ".join(plan.problems)
    f16 = plan_get("geochat-7b", "gguf", "f16", tmp_path / "cache", catalog=catalog)
    assert f16.ok and f16.temp_bytes == 0
    assert hub.weight_requests() == [] or all(r[1].endswith("config.json")
                                              for r in hub.weight_requests())
    assert not (tmp_path / "cache").exists()  # planning writes nothing


def test_plan_for_the_real_checkpoint_sizes_from_the_catalog(catalog, tmp_path, monkeypatch):
    """Without a hub (online=False) the 7B plan uses the catalog's sizes: ~14.1 + ~1.7 GB."""
    plan = plan_get("geochat-7b", "gguf", "q4_k_m", tmp_path, catalog=catalog, online=False)
    total = {s.repo: s.total_bytes for s in plan.sources}
    assert 14.0e9 < total[GEOCHAT_REPO] < 14.3e9 and 1.6e9 < total[CLIP_REPO] < 1.8e9
    sizes = {(c.target, c.quant): c.bytes for c in plan.choices}
    assert 4.0e9 < sizes["gguf", "q4_k_m"] < 5.5e9
    assert 12.5e9 < sizes["gguf", "f16"] < 15e9 and 12.5e9 < sizes["hf", None] < 15e9
    assert plan.memory_needed == pytest.approx(9.98e9 + (1 << 30))


def test_get_ends_with_a_ready_model_that_answers_and_carries_provenance(hub, catalog, tmp_path):
    needs_llama()
    seen = []
    model = get_model("geochat-7b", "gguf", "q4_k_m", tmp_path / "cache", catalog=catalog,
                      on_progress=lambda *a: seen.append(a))
    assert model.model_path.name == "model.gguf" and model.mmproj_path.name == "mmproj.gguf"
    assert {p[0] for p in seen} >= {"download", "convert", "quantize", "verify"}
    downloads = [p for p in seen if p[0] == "download"]
    assert downloads[-1][1] == downloads[-1][2]  # all bytes
    record = json.loads((model.folder / "provenance.json").read_text())
    sources = {s["repo"]: s for s in record["source"]}
    assert sources[GEOCHAT_REPO]["commit"] == "a" * 40
    served = hub.repos[GEOCHAT_REPO].files
    assert sources[GEOCHAT_REPO]["files"][SHARD_2] == hashlib.sha256(served[SHARD_2]).hexdigest()
    assert record["quant"] == "q4_k_m" and record["converter"]["name"].endswith("gguf_writer")
    gguf_hash = hashlib.sha256(model.model_path.read_bytes()).hexdigest()
    assert record["outputs"]["model.gguf"]["sha256"] == gguf_hash
    attributes = provenance_attributes(model.model_path)
    assert set(attributes) == set(PROVENANCE_FIELDS)
    assert attributes["model_src"] == GEOCHAT_REPO and attributes["model_rev"] == "a" * 40
    assert attributes["quant"] == "q4_k_m" and len(attributes["model_hash"]) == 64
    assert _answers(model.model_path, model.mmproj_path)  # it loads and answers
    again = get_model("geochat-7b", "gguf", "q4_k_m", tmp_path / "cache", catalog=catalog)
    assert again.folder == model.folder  # already there: nothing fetched again
    assert plan_get("geochat-7b", "gguf", "q4_k_m", tmp_path / "cache",
                    catalog=catalog).installed == str(model.folder)


def test_a_download_cut_half_way_resumes(hub, catalog, tmp_path):
    half = len(hub.repos[GEOCHAT_REPO].files[SHARD_2]) // 2
    hub.cut_always[GEOCHAT_REPO, SHARD_2] = half
    with pytest.raises(DownloadError, match="broke off"):
        get_model("geochat-7b", "hf", cache=tmp_path, catalog=catalog, retries=0)
    part = tmp_path / "models" / "geochat-7b" / (SHARD_2 + ".part")
    assert part.stat().st_size == half
    assert not (tmp_path / "converted" / "geochat-7b" / "hf").exists()
    del hub.cut_always[GEOCHAT_REPO, SHARD_2]
    hub.requests.clear()
    plan = plan_get("geochat-7b", "hf", cache=tmp_path, catalog=catalog)
    assert plan.sources[0].partial_bytes == half
    model = get_model("geochat-7b", "hf", cache=tmp_path, catalog=catalog)
    ranges = [r for m, p, r in hub.weight_requests() if p.endswith(SHARD_2)]
    assert ranges == [f"bytes={half}-"]  # the rest only
    geochat = [p for _, p, _ in hub.weight_requests() if GEOCHAT_REPO in p]
    assert geochat and all(f"/resolve/{'a' * 40}/" in p for p in geochat)  # the pinned commit
    shard = tmp_path / "models" / "geochat-7b" / SHARD_2
    assert shard.read_bytes() == hub.repos[GEOCHAT_REPO].files[SHARD_2]
    assert model.target == "hf" and (model.folder / "config.json").is_file()  # converted without torch
    assert ("transformers" in model.backends) == (importlib.util.find_spec("torch") is not None)


@pytest.mark.needs_torch
def test_the_hf_copy_got_runs_in_transformers(hub, catalog, tmp_path):
    from geochat_qgis.core.backends.transformers_backend import TransformersBackend

    model = get_model("geochat-7b", "hf", cache=tmp_path, catalog=catalog)
    assert "transformers" in model.backends
    tile = np.random.default_rng(5).integers(0, 256, (504, 504, 3), dtype=np.uint8)
    with TransformersBackend(model.model_path) as backend:  # loads (no missing keys) and answers
        answer = backend.generate([tile], Conversation.single("[refer] Give me the location of "
                                                              "<p> car </p>"),
                                  GenerateOptions(max_new_tokens=4))[0]
    assert answer.generated_tokens > 0


def test_cancel_during_conversion_leaves_no_model_and_no_temporary_files(hub, catalog, tmp_path):
    needs_llama()
    cancel = CancelToken()

    def progress(phase, done, total, rate, eta):
        if phase == "convert" and done >= 3:
            cancel.cancel()

    with pytest.raises(Cancelled):
        get_model("geochat-7b", "gguf", "q8_0", tmp_path, on_progress=progress, cancel=cancel,
                  catalog=catalog)
    converted = tmp_path / "converted" / "geochat-7b"
    assert list(converted.iterdir()) == []  # no model, no staging folder, no lock, no .partial
    downloads = tmp_path / "models" / "geochat-7b"
    assert not list(downloads.glob("*.part"))  # the downloads finished and are kept
    model = get_model("geochat-7b", "gguf", "q8_0", tmp_path, catalog=catalog)  # restarts cleanly
    assert sorted(p.name for p in model.folder.iterdir()) == [
        "mmproj.gguf", "model.gguf", "provenance.json"]


def test_a_killed_conversion_is_not_installed_and_restarts_cleanly(hub, catalog, tmp_path):
    """What a killed process leaves (a staging folder, a folder without provenance) never
    counts as installed and is cleared by the next get."""
    get_model("geochat-7b", "gguf", "f16", tmp_path, catalog=catalog)
    folder = tmp_path / "converted" / "geochat-7b" / "gguf-f16"
    (folder / "provenance.json").unlink()  # as if killed before the record was written
    stale = folder.parent / ".gguf-f16.x1y2.partial"
    stale.mkdir()
    (stale / "model-unquantised.gguf").write_bytes(b"half")
    assert plan_get("geochat-7b", "gguf", "f16", tmp_path, catalog=catalog).installed is None
    model = get_model("geochat-7b", "gguf", "f16", tmp_path, catalog=catalog)
    assert (model.folder / "provenance.json").is_file() and not stale.exists()


def test_missing_shard_on_the_server_gives_a_clear_message(hub, catalog, tmp_path):
    del hub.repos[GEOCHAT_REPO].files[SHARD_2]
    with pytest.raises(DownloadError) as info:
        get_model("geochat-7b", "gguf", "q4_k_m", tmp_path, catalog=catalog)
    message = str(info.value)
    assert GEOCHAT_REPO in message and SHARD_2 in message and "a" * 40 in message
    assert hub.weight_requests() == []  # refused before downloading anything
    assert not (tmp_path / "models").exists()


def test_clip_in_the_huggingface_cache_is_reused_not_downloaded(hub, catalog, tmp_path,
                                                                monkeypatch):
    needs_llama()
    """CLIP-336 put into the HF cache by huggingface_hub itself (from this same hub) is linked."""
    from huggingface_hub import hf_hub_download

    hf_cache = tmp_path / "hf-cache"
    for name in ("config.json", "preprocessor_config.json", "pytorch_model.bin"):
        hf_hub_download(CLIP_REPO, name, cache_dir=str(hf_cache), endpoint=hub.url)
    hub.requests.clear()
    plan = plan_get("geochat-7b", "gguf", "q4_k_m", tmp_path / "cache", catalog=catalog,
                    hf_cache=hf_cache)
    clip = next(s for s in plan.sources if s.repo == CLIP_REPO)
    assert clip.hf_cache_bytes == clip.total_bytes and clip.fetch_bytes == 0
    get_model("geochat-7b", "gguf", "q4_k_m", tmp_path / "cache", catalog=catalog,
              hf_cache=hf_cache)
    fetched = {p for _, p, _ in hub.weight_requests()}
    assert not any(CLIP_REPO in p for p in fetched) and any(GEOCHAT_REPO in p for p in fetched)
    linked = tmp_path / "cache" / "models" / "clip-vit-large-patch14-336" / "pytorch_model.bin"
    assert linked.is_symlink() and linked.resolve().is_relative_to(hf_cache)
    # deleting the originals afterwards frees the GeoChat download, never the user's HF cache
    offer = source_cleanup("geochat-7b", tmp_path / "cache", catalog)
    geochat_bytes = sum(len(d) for d in hub.repos[GEOCHAT_REPO].files.values())
    assert geochat_bytes <= offer.bytes < geochat_bytes + 20000
    assert delete_sources("geochat-7b", tmp_path / "cache", catalog) == offer.bytes
    assert not (tmp_path / "cache" / "models" / "geochat-7b").exists()
    assert any(hf_cache.rglob("pytorch_model.bin"))
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", "http://127.0.0.1:9")  # and without the hub
    model = get_model("geochat-7b", "gguf", "q4_k_m", tmp_path / "cache", catalog=catalog)
    assert _answers(model.model_path, model.mmproj_path)  # still runs without the originals


def test_offline_mode_uses_what_is_here_and_refuses_clearly_otherwise(hub, catalog, tmp_path,
                                                                     monkeypatch):
    needs_llama()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = plan_get("geochat-7b", "gguf", "q4_k_m", tmp_path, catalog=catalog)
    assert not plan.ok and "HF_HUB_OFFLINE" in " ".join(plan.problems)
    with pytest.raises(Exception, match="Offline mode"):
        get_model("geochat-7b", "gguf", "q4_k_m", tmp_path, catalog=catalog)
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    get_model("geochat-7b", "hf", cache=tmp_path, catalog=catalog)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    model = get_model("geochat-7b", "gguf", "q4_k_m", tmp_path, catalog=catalog)
    assert model.model_path.is_file() and hub.requests == []  # converted from what is here


def test_hf_endpoint_token_and_proxy_are_honoured(hub, catalog, tmp_path, monkeypatch):
    """HF_ENDPOINT names the hub, HF_TOKEN is sent, HTTP_PROXY carries every request."""
    monkeypatch.delenv("GEOCHAT_HF_ENDPOINT")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HTTP_PROXY", hub.url)  # the hub answers as a proxy too
    monkeypatch.setenv("NO_PROXY", "")
    get_model("geochat-7b", "gguf", "f16", tmp_path, catalog=catalog)
    assert hub.proxied and all(u.startswith("http://hub.example.invalid/") for u in hub.proxied)
    assert set(hub.auth) == {"Bearer hf_test_token"}


def test_catalog_gguf_models_use_the_same_flow(hub, catalog, tmp_path, repos):
    """A model used as downloaded (a GGUF pair) is got the same way, with provenance."""
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    built = build_tiny_geochat(tmp_path / "pair", "gguf")
    entry = catalog.get("qwen2.5-vl-3b-gguf")
    folder = tmp_path / "repo"
    folder.mkdir()
    for item in entry.files:
        source = built / ("mmproj.gguf" if item.role == "mmproj" else "model.gguf")
        shutil.copy(source, folder / item.path)
    raw = json.loads(BUILTIN_CATALOG.read_text())
    for model in raw["models"]:
        if model["name"] == entry.name:
            for item in model["files"]:
                data = (folder / item["path"]).read_bytes()
                item.update(size=len(data), approx_size=len(data),
                            sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "catalog.json").write_text(json.dumps(raw))
    custom = load_catalog(include_user=False, builtin=tmp_path / "catalog.json")
    hub.add_folder(entry.repo, folder, commit=entry.revision)
    model = get_model(entry.name, cache=tmp_path / "cache", catalog=custom)
    assert model.target == "download" and model.model_path.name.endswith("Q4_K_M.gguf")
    attributes = provenance_attributes(model.model_path)
    assert attributes["model_src"] == entry.repo and attributes["quant"] == "q4_k_m"
    assert attributes["model_hash"] == hashlib.sha256(model.model_path.read_bytes()).hexdigest()


def test_cancel_during_download_keeps_the_bytes_and_the_next_get_fetches_the_rest(hub, catalog,
                                                                                tmp_path):
    cancel = CancelToken()
    files = hub.repos[GEOCHAT_REPO].files
    order = [f.path for f in catalog.get("geochat-7b").files]
    before = sum(len(files[name]) for name in order[:order.index(SHARD_2)])
    hub.delay[GEOCHAT_REPO, SHARD_2] = 0.3  # so the progress call as it starts gets through

    def progress(phase, done, total, rate, eta):
        if phase == "download" and done >= before:
            cancel.cancel()

    with pytest.raises(Cancelled):
        get_model("geochat-7b", "hf", cache=tmp_path, on_progress=progress, cancel=cancel,
                  catalog=catalog)
    folder = tmp_path / "models" / "geochat-7b"
    kept = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert kept and not (tmp_path / "converted" / "geochat-7b" / "hf").exists()
    first = {p for _, p, _ in hub.weight_requests()}
    hub.requests.clear()
    get_model("geochat-7b", "hf", cache=tmp_path, catalog=catalog)
    complete = {name for name in kept if not name.endswith(".part")}
    again = {p.rsplit("/", 1)[1] for _, p, _ in hub.weight_requests() if GEOCHAT_REPO in p}
    assert "pytorch_model-00001-of-00002.bin" in complete and SHARD_2 not in complete
    assert first and again and not (again & complete)  # what was complete is not fetched again


def test_too_little_memory_for_the_conversion_is_refused_unless_asked(hub, catalog, tmp_path,
                                                                     monkeypatch):
    from geochat_qgis.core.weights import get_plan
    from geochat_qgis.core.weights.get import GetRefused

    monkeypatch.setattr(get_plan, "memory_available", lambda: 1 << 30)  # a 1 GB machine
    with pytest.raises(GetRefused, match="memory"):
        get_model("geochat-7b", "hf", cache=tmp_path, catalog=catalog)
    assert hub.weight_requests() == [] or all(p.endswith("config.json")
                                              for _, p, _ in hub.weight_requests())
    plan = plan_get("geochat-7b", "hf", cache=tmp_path, catalog=catalog, ignore_memory=True)
    assert plan.ok and any("memory" in note for note in plan.notes)


def test_a_clip_of_the_users_own_is_used_in_place(hub, catalog, tmp_path, repos):
    """A user catalog entry pointing CLIP-336 at a local folder: used there, never fetched."""
    from geochat_qgis.core.weights.catalog import add_user_entry

    user = tmp_path / "user.json"
    add_user_entry({"name": "clip-vit-large-patch14-336", "family": "clip", "path": str(repos[1]),
                    "files": ["config.json", "preprocessor_config.json", "pytorch_model.bin"]},
                   user)
    mine = load_catalog(user)
    model = get_model("geochat-7b", "gguf", "f16", tmp_path / "cache", catalog=mine)
    assert not any(CLIP_REPO in p for _, p, _ in hub.weight_requests())
    assert not (tmp_path / "cache" / "models" / "clip-vit-large-patch14-336").exists()
    assert model.model_path.is_file()
    offer = source_cleanup("geochat-7b", tmp_path / "cache", mine)
    assert offer.folders == (tmp_path / "cache" / "models" / "geochat-7b",)  # never the user's
    delete_sources("geochat-7b", tmp_path / "cache", mine)
    assert (repos[1] / "pytorch_model.bin").is_file()


def test_a_snapshot_model_of_several_files_is_got_the_same_way(hub, tmp_path):
    """A user's catalog entry for a whole repository ("snapshot": true) downloads every file of
    it, with provenance."""
    from geochat_qgis.core.weights.catalog import add_user_entry

    files = {"config.json": b'{"model_type": "custom"}', "modeling_custom.py": b"# code\n",
             "pytorch_model-00001-of-00002.bin": os.urandom(3000),
             "pytorch_model-00002-of-00002.bin": os.urandom(2000)}
    folder = tmp_path / "custom"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    hub.add_folder("someone/custom-model", folder, commit="e" * 40)
    user = tmp_path / "user.json"
    add_user_entry({"name": "custom-model", "family": "geochat", "format": "gguf",
                    "repo": "someone/custom-model", "snapshot": True,
                    "backends": ["llama.cpp"]}, user)
    catalog = load_catalog(user)
    plan = plan_get("custom-model", cache=tmp_path / "cache", catalog=catalog)
    assert plan.download_bytes == sum(map(len, files.values())) and plan.memory_needed == 0
    model = get_model("custom-model", cache=tmp_path / "cache", catalog=catalog)
    assert model.target == "download" and model.model_path == model.folder
    assert sorted(p.name for p in model.folder.iterdir() if not p.name.startswith(".")) == \
        sorted(files)
    attributes = provenance_attributes(model.model_path)
    assert attributes["model_src"] == "someone/custom-model"
    assert attributes["model_rev"] == "e" * 40 and len(attributes["model_hash"]) == 64


def test_model_list_says_what_getting_takes_and_what_runs_each_model_here(hub, catalog,
                                                                          tmp_path):
    from geochat_qgis.core.weights.listing import model_list
    from geochat_qgis.core.weights.machine import backends_here

    here = backends_here()
    rows = {r["name"]: r for r in model_list(tmp_path, catalog)}
    assert set(rows) == set(catalog.names())
    geochat = rows["geochat-7b"]
    assert geochat["status"] == "missing" and geochat["needs_conversion"]
    assert 15.5e9 < geochat["download_bytes"] < 16.2e9  # 14.1 GB + 1.7 GB, from the catalog
    gguf = next(c for c in geochat["choices"] if c["quant"] == "q4_k_m")
    assert ("llama.cpp" in gguf["backends"]) == (here["llama.cpp"] is None)
    assert "openai" in gguf["not_here"]  # a server the user runs, not this machine
    if here["geopixel"]:  # no torch here: GeoPixel runs nowhere and the list says why
        assert rows["geopixel-7b"]["choices"][0]["backends"] == []
        assert "geopixel" in rows["geopixel-7b"]["choices"][0]["not_here"]
    assert hub.requests == []  # the list asks no server
    get_model("geochat-7b", "gguf", "f16", tmp_path, catalog=catalog)
    rows = {r["name"]: r for r in model_list(tmp_path, catalog)}
    assert rows["geochat-7b"]["status"] == "ready"
    f16 = next(c for c in rows["geochat-7b"]["choices"] if c["quant"] == "f16")
    assert f16["installed"] == str(tmp_path / "converted" / "geochat-7b" / "gguf-f16")


def test_a_second_get_while_one_runs_is_refused_clearly(hub, catalog, tmp_path):
    """Two QGIS windows (or QGIS and the command line) never write the same files at once."""
    import threading

    from geochat_qgis.core.errors import ModelError

    hub.delay[GEOCHAT_REPO, SHARD_2] = 1.5  # keeps the first get busy downloading
    first = threading.Thread(target=get_model, args=("geochat-7b", "hf"),
                             kwargs={"cache": tmp_path, "catalog": catalog})
    first.start()
    lock = tmp_path / "models" / ".geochat-7b.lock"
    for _ in range(200):
        if lock.exists():
            break
        threading.Event().wait(0.02)
    with pytest.raises(ModelError, match="another process"):
        get_model("geochat-7b", "gguf", "f16", tmp_path, catalog=catalog)
    first.join()
    assert get_model("geochat-7b", "gguf", "f16", tmp_path, catalog=catalog).model_path.is_file()
