"""``python -m geochat_qgis models get`` against the tiny hub: the same model as the function."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_repos import CLIP_REPO, GEOCHAT_REPO, serve_repo_hub, tiny_geochat_repos

from geochat_qgis.core.weights.catalog import load_catalog
from geochat_qgis.core.weights.get import get_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    geochat, clip = tiny_geochat_repos(tmp_path_factory.mktemp("repos"))
    server = next(generator := serve_repo_hub())
    server.add_folder(GEOCHAT_REPO, geochat, commit="b" * 40)
    server.add_folder(CLIP_REPO, clip, commit="d" * 40)
    yield server
    generator.close()


def _env(hub, tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GEOCHAT_HF_ENDPOINT", "HF_HUB_OFFLINE", "GEOCHAT_USER_CATALOG")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf"),
               GEOCHAT_USER_CATALOG=str(tmp_path / "none.json"), **extra)
    return env


def _cli(hub, tmp_path, *args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geochat_qgis", "models", *args], cwd=ROOT,
                          env=_env(hub, tmp_path, **extra), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("to, quant", [("gguf", "q4_k_m"), ("hf", None)])
def test_cli_get_gives_the_same_model_as_the_function(hub, tmp_path, monkeypatch, to, quant):
    if quant:
        pytest.importorskip("llama_cpp")
    args = ["--cache", str(tmp_path / "cli"), "get", "geochat-7b", "--to", to]
    run = _cli(hub, tmp_path, *args, *(["--quant", quant] if quant else []))
    assert run.returncode == 0, run.stderr
    assert "geochat-7b: ready in" in run.stdout and "disk:" in run.stdout
    assert "--delete-source" in run.stdout  # the offer to delete the originals
    assert "100%" in run.stderr  # progress on stderr
    for name, value in _env(hub, tmp_path).items():
        monkeypatch.setenv(name, value)
    model = get_model("geochat-7b", to, quant, tmp_path / "fn",
                      catalog=load_catalog(include_user=False))
    cli_record = json.loads((tmp_path / "cli" / "converted" / "geochat-7b" / model.folder.name /
                             "provenance.json").read_text())
    assert cli_record["model_hash"] == model.provenance["model_hash"]
    assert {n: o["sha256"] for n, o in cli_record["outputs"].items()} == \
        {n: o["sha256"] for n, o in model.provenance["outputs"].items()}
    assert cli_record["source"] == model.provenance["source"]


def test_cli_plan_json_and_delete_source(hub, tmp_path):
    cache = str(tmp_path / "cache")
    run = _cli(hub, tmp_path, "--cache", cache, "get", "geochat-7b", "--to", "hf", "--plan",
               "--json")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["ok"] and plan["target"] == "hf" and plan["disk_needed"] > 0
    assert [s["repo"] for s in plan["sources"]] == [GEOCHAT_REPO, CLIP_REPO]
    assert not Path(cache).exists()
    run = _cli(hub, tmp_path, "--cache", cache, "get", "geochat-7b", "--to", "hf",
               "--delete-source", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["freed_bytes"] > 0 and Path(result["model_path"], "config.json").is_file()
    assert not (Path(cache) / "models" / "geochat-7b").exists()
    listing = _cli(hub, tmp_path, "--cache", cache, "list", "--json")
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["geochat-7b"]["ready"]
    hf = next(c for c in rows["geochat-7b"]["choices"] if c["target"] == "hf")
    assert hf["installed"] == result["folder"]
    run = _cli(hub, tmp_path, "--cache", cache, "remove", "geochat-7b", "--to", "hf")
    assert run.returncode == 0 and "removed" in run.stdout, run.stderr
    assert not Path(result["folder"]).exists()


def test_cli_missing_shard_and_offline_give_clear_messages(hub, tmp_path):
    files = hub.repos[GEOCHAT_REPO].files
    shard = files.pop("pytorch_model-00001-of-00002.bin")
    try:
        run = _cli(hub, tmp_path, "--cache", str(tmp_path / "c"), "get", "geochat-7b")
    finally:
        files["pytorch_model-00001-of-00002.bin"] = shard
    assert run.returncode == 1
    assert "pytorch_model-00001-of-00002.bin" in run.stderr and "Traceback" not in run.stderr
    run = _cli(hub, tmp_path, "--cache", str(tmp_path / "c"), "get", "geochat-7b",
               HF_HUB_OFFLINE="1")
    assert run.returncode == 1 and "HF_HUB_OFFLINE" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_killed_get_resumes_its_download_after_a_restart(hub, tmp_path):
    """The process dies mid-download (as when QGIS is closed); the next one resumes the file."""
    import signal
    import time

    shard = "pytorch_model-00002-of-00002.bin"
    data = hub.repos[GEOCHAT_REPO].files[shard]
    half = len(data) // 2
    hub.release.clear()
    hub.stall_after[GEOCHAT_REPO, shard] = half
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "geochat_qgis", "models", "--cache", str(cache), "get",
            "geochat-7b", "--to", "hf"]
    child = subprocess.Popen(args, cwd=ROOT, env=_env(hub, tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    part = cache / "models" / "geochat-7b" / (shard + ".part")
    deadline = time.monotonic() + 120
    while not (part.is_file() and part.stat().st_size == half) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    hub.release.set()
    assert part.stat().st_size == half
    assert not (cache / "converted" / "geochat-7b" / "hf").exists()
    hub.requests.clear()
    run = _cli(hub, tmp_path, "--cache", str(cache), "get", "geochat-7b", "--to", "hf")
    assert run.returncode == 0, run.stderr
    assert [r for _, p, r in hub.weight_requests() if p.endswith(shard)] == [f"bytes={half}-"]
    assert (cache / "models" / "geochat-7b" / shard).read_bytes() == data


def test_detect_runs_with_the_got_model_and_its_features_carry_provenance(hub, tmp_path,
                                                                         demo_raster):
    pytest.importorskip("llama_cpp")
    import pyogrio

    from geochat_qgis.core import export
    from geochat_qgis.core.weights.provenance import PROVENANCE_FIELDS, provenance_attributes

    cache = tmp_path / "cache"
    run = _cli(hub, tmp_path, "--cache", str(cache), "get", "geochat-7b", "--json")
    assert run.returncode == 0, run.stderr
    model = json.loads(run.stdout)
    out = tmp_path / "cars.gpkg"
    detect = subprocess.run(
        [sys.executable, "-m", "geochat_qgis", "detect", str(demo_raster), "--model",
         model["folder"], "--backend", "llama.cpp", "--task", "refer", "--prompt", "car",
         "--max-new-tokens", "30", "--grammar", "-o", str(out)],
        cwd=ROOT, env=_env(hub, tmp_path), capture_output=True, text=True, timeout=600)
    assert detect.returncode == 0, detect.stderr
    frame = pyogrio.read_dataframe(out)
    assert len(frame) > 0 and set(frame["label"]) == {"car"}
    assert set(PROVENANCE_FIELDS) <= {f.name for f in export.FIELDS}
    assert all(len(f.shp_name) <= 10 for f in export.FIELDS)
    expected = provenance_attributes(model["model_path"])
    for name in PROVENANCE_FIELDS:
        assert set(frame[name]) == {expected[name]}, name
