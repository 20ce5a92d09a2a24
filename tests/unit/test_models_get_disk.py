"""A full disk (a small tmpfs as the model cache) is refused before any byte is downloaded."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from hub_repos import CLIP_REPO, GEOCHAT_REPO, serve_repo_hub, tiny_geochat_repos

from geochat_qgis.core.errors import GeoChatError
from geochat_qgis.core.weights import get_plan
from geochat_qgis.core.weights.catalog import load_catalog
from geochat_qgis.core.weights.get import GetRefused, get_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    geochat, clip = tiny_geochat_repos(tmp_path_factory.mktemp("repos"))
    server = next(generator := serve_repo_hub())
    server.add_folder(GEOCHAT_REPO, geochat)
    server.add_folder(CLIP_REPO, clip)
    yield server
    generator.close()


@pytest.fixture
def env(hub, monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "HTTP_PROXY", "http_proxy", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    hub.requests.clear()
    return hub


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (root only); unmounted afterwards."""
    mounted = []

    def mount(size: str):
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {run.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    import gc

    gc.collect()  # memory-mapped shards of a conversion keep the file system busy
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)  # detach once unused


def _contents(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_full_disk_is_refused_before_any_byte_is_downloaded(env, small_disk):
    cache = small_disk("4m")
    with pytest.raises(GetRefused) as info:
        get_model("geochat-7b", "gguf", "q8_0", cache, catalog=load_catalog(include_user=False))
    assert "Not enough free disk space" in str(info.value) and str(cache) in str(info.value)
    assert not info.value.plan.ok and info.value.plan.disk_free <= 4 << 20
    assert env.weight_requests() == [] or all(p.endswith("config.json")
                                              for _, p, _ in env.weight_requests())
    assert _contents(cache) == []  # nothing written


def test_downloads_that_fit_are_refused_when_output_and_temporary_files_do_not(
        env, small_disk, monkeypatch):
    """The check counts downloads + output + temporary: downloads alone would fit here."""
    monkeypatch.setattr(get_plan, "SPACE_MARGIN_BYTES", 0)
    catalog = load_catalog(include_user=False)
    cache = small_disk("2m")
    plan = get_plan.plan_get("geochat-7b", "gguf", "q8_0", cache, catalog=catalog)
    assert plan.download_bytes < plan.disk_free < plan.disk_needed
    with pytest.raises(GetRefused, match="temporary"):
        get_model("geochat-7b", "gguf", "q8_0", cache, catalog=catalog)
    assert _contents(cache) == []


def test_the_same_get_succeeds_on_a_disk_big_enough(env, small_disk):
    cache = small_disk("96m")
    model = get_model("geochat-7b", "hf", cache=cache, catalog=load_catalog(include_user=False))
    assert model.folder.is_relative_to(cache) and (model.folder / "provenance.json").is_file()


def test_a_disk_filled_by_another_program_mid_download_gives_a_clear_message(
        env, small_disk, monkeypatch):
    """The plan fitted, then something else took the space: a clear message, partial files
    kept, and the get finishes once space is freed."""
    monkeypatch.setattr(get_plan, "SPACE_MARGIN_BYTES", 0)
    from geochat_qgis.core.weights import download

    monkeypatch.setattr(download, "SPACE_MARGIN_BYTES", 0)
    catalog = load_catalog(include_user=False)
    cache = small_disk("8m")
    hog = cache / "someone-elses-file"
    shard = "pytorch_model-00001-of-00002.bin"
    order = [f.path for f in catalog.get("geochat-7b").files]
    files = env.repos[GEOCHAT_REPO].files
    before = sum(len(files[name]) for name in order[:order.index(shard)])
    env.delay[GEOCHAT_REPO, shard] = 0.3  # its first progress call is not merged into another

    def fill(phase, done, total, rate, eta):
        # as the shard starts (its free-space checks passed), another program takes the space
        if phase == "download" and done >= before and not hog.exists():
            with open(hog, "wb") as handle:  # everything but 128 kB
                handle.write(b"\0" * (shutil.disk_usage(cache).free - (128 << 10)))

    with pytest.raises(GeoChatError, match="disk is full") as info:
        get_model("geochat-7b", "hf", cache=cache, catalog=catalog, on_progress=fill)
    assert "resume" in str(info.value) and hog.is_file()
    assert isinstance(info.value.__cause__, OSError)  # a real ENOSPC from the write
    assert (cache / "models" / "geochat-7b" / (shard + ".part")).is_file()  # kept to resume
    assert not (cache / "converted" / "geochat-7b" / "hf").exists()
    hog.unlink()
    model = get_model("geochat-7b", "hf", cache=cache, catalog=catalog)
    assert (model.folder / "provenance.json").is_file()
