"""Downloads against a real HTTP server on 127.0.0.1 (Range support, hub-style URLs and API)."""
from __future__ import annotations

import hashlib
import json
import os
import socket

import pytest

from geochat_qgis.cli import main
from geochat_qgis.core.backends.base import CancelToken
from geochat_qgis.core.errors import Cancelled, ModelError
from geochat_qgis.core.weights import download
from geochat_qgis.core.weights.catalog import parse_entry
from geochat_qgis.core.weights.download import DownloadError, check_free_space, download_file
from geochat_qgis.core.weights.store import (
    download_model, model_status, remove_model, verify_model,
)

SIZE = 3 * download.CHUNK_BYTES + 12345  # several chunks, not a multiple of one


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


def _put(hub, path: str, data: bytes) -> str:
    hub.files[path] = data
    return hub.url + path


def test_full_download_reports_progress_and_verifies(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    seen = []
    digest = download_file(url, tmp_path / "w.bin", size=SIZE,
                           sha256=hashlib.sha256(payload).hexdigest(),
                           progress=lambda d, t: seen.append((d, t)))
    assert (tmp_path / "w.bin").read_bytes() == payload
    assert digest == hashlib.sha256(payload).hexdigest()
    assert not (tmp_path / "w.bin.part").exists()
    assert seen[-1] == (SIZE, SIZE) and seen == sorted(seen) and len(seen) >= 4


def test_redirect_to_a_cdn_keeps_range_and_drops_the_token(hub, cdn, payload, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    _put(cdn, "/blob/w.bin", payload)
    hub.redirects["/o/r/resolve/main/w.bin"] = cdn.url + "/blob/w.bin"
    cdn.drop_after["/blob/w.bin"] = SIZE // 3
    download_file(hub.url + "/o/r/resolve/main/w.bin", tmp_path / "w.bin", size=SIZE,
                  sha256=hashlib.sha256(payload).hexdigest(), retries=1)
    assert (tmp_path / "w.bin").read_bytes() == payload
    assert hub.auth == ["Bearer hf_secret", "Bearer hf_secret"]  # asked twice (resume)
    assert cdn.auth == ["", ""]  # the token never left the hub's host
    assert [r for _, r in cdn.requests] == ["", f"bytes={SIZE // 3}-"]


def test_checksum_mismatch_deletes_the_file(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    with pytest.raises(DownloadError, match="Checksum mismatch.*deleted"):
        download_file(url, tmp_path / "w.bin", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_a_clear_404(hub, tmp_path):
    with pytest.raises(DownloadError, match="Not found \\(HTTP 404\\).*catalog entry"):
        download_file(hub.url + "/o/r/resolve/main/nope.bin", tmp_path / "x", retries=0)


def test_server_down_says_offline(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="Cannot reach .*offline or the server is down"):
        download_file(f"http://127.0.0.1:{port}/f", tmp_path / "f", retries=0)


def test_interrupted_download_resumes_automatically_with_range(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    hub.drop_after["/o/r/resolve/main/w.bin"] = SIZE // 2
    download_file(url, tmp_path / "w.bin", size=SIZE, retries=2,
                  sha256=hashlib.sha256(payload).hexdigest())
    assert (tmp_path / "w.bin").read_bytes() == payload
    assert [r for _, r in hub.requests] == ["", f"bytes={SIZE // 2}-"]


def test_interrupted_download_keeps_partial_then_a_later_call_resumes(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    hub.drop_after["/o/r/resolve/main/w.bin"] = SIZE // 2
    with pytest.raises(DownloadError, match="partial file .* kept"):
        download_file(url, tmp_path / "w.bin", size=SIZE, retries=0)
    assert (tmp_path / "w.bin.part").stat().st_size == SIZE // 2
    assert not (tmp_path / "w.bin").exists()
    seen = []
    download_file(url, tmp_path / "w.bin", size=SIZE, retries=0,
                  sha256=hashlib.sha256(payload).hexdigest(),
                  progress=lambda d, t: seen.append(d))
    assert hub.requests[-1][1] == f"bytes={SIZE // 2}-"
    assert seen[0] == SIZE // 2  # progress starts from the resumed bytes
    assert (tmp_path / "w.bin").read_bytes() == payload


def test_server_ignoring_range_restarts_cleanly(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    (tmp_path / "w.bin.part").write_bytes(b"garbage that is not the start")
    hub.ignore_range = True
    download_file(url, tmp_path / "w.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert (tmp_path / "w.bin").read_bytes() == payload


def test_cancel_keeps_partial_for_resume(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    token = CancelToken()

    def cancel_after_first_chunk(done: int, total) -> None:
        if done > 0:
            token.cancel()

    with pytest.raises(Cancelled, match="kept"):
        download_file(url, tmp_path / "w.bin", progress=cancel_after_first_chunk, cancel=token)
    kept = (tmp_path / "w.bin.part").stat().st_size
    assert 0 < kept < SIZE
    download_file(url, tmp_path / "w.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert hub.requests[-1][1] == f"bytes={kept}-"


def test_size_differing_from_catalog_is_refused(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    with pytest.raises(DownloadError, match="catalog expects"):
        download_file(url, tmp_path / "w.bin", size=SIZE + 1)


def test_free_space_is_checked_before_starting(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    with pytest.raises(DownloadError, match="Not enough free disk space"):
        download_file(url, tmp_path / "w.bin", size=10**18)
    assert hub.requests == []  # refused before any transfer
    check_free_space(tmp_path / "not" / "yet", 1)  # a folder still to be created is fine


def _entry(hub, **extra):
    raw = {"name": "tiny", "family": "qwen2.5-vl", "repo": "o/tiny",
           "files": [{"path": "model.gguf", "role": "model"}, {"path": "sub/mmproj.gguf",
                                                                "role": "mmproj"}]}
    raw.update(extra)
    return parse_entry(raw, "test")


def test_model_download_verify_remove_with_checksums_from_the_hub_api(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", hub.url)
    model, mmproj = os.urandom(SIZE), os.urandom(5000)
    _put(hub, "/o/tiny/resolve/main/model.gguf", model)
    _put(hub, "/o/tiny/resolve/main/sub/mmproj.gguf", mmproj)
    entry = _entry(hub)
    assert model_status(entry, tmp_path) == "missing"
    seen = []
    folder = download_model(entry, tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert folder == tmp_path / "models" / "tiny"
    assert entry.path_of("mmproj", tmp_path).read_bytes() == mmproj
    assert seen[-1] == (SIZE + 5000, SIZE + 5000)
    assert model_status(entry, tmp_path) == "installed"
    assert {c.status for c in verify_model(entry, tmp_path)} == {"ok"}
    # a second download is a no-op: nothing fetched again
    count = len(hub.requests)
    download_model(entry, tmp_path)
    assert [p for p, _ in hub.requests[count:] if "/resolve/" in p] == []
    # damage one byte: verify catches it through the sha256 recorded at download time
    target = entry.path_of("model", tmp_path)
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    checks = {c.path: c.status for c in verify_model(entry, tmp_path)}
    assert checks == {"model.gguf": "sha256-mismatch", "sub/mmproj.gguf": "ok"}
    manifest_bytes = (folder / ".geochat-manifest.json").stat().st_size
    assert remove_model(entry, tmp_path) == SIZE + 5000 + manifest_bytes
    assert not folder.exists()
    assert model_status(entry, tmp_path) == "missing"


def test_hub_checksum_catches_a_corrupt_transfer(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", hub.url)
    _put(hub, "/o/tiny/resolve/main/model.gguf", b"a" * 1000)
    _put(hub, "/o/tiny/resolve/main/sub/mmproj.gguf", b"b" * 10)
    real = hub.files["/o/tiny/resolve/main/model.gguf"]
    entry = _entry(hub, files=[{"path": "model.gguf",
                                "sha256": hashlib.sha256(b"c" * 1000).hexdigest()}])
    with pytest.raises(DownloadError, match="Checksum mismatch"):
        download_model(entry, tmp_path)
    assert real == b"a" * 1000


def test_partial_file_longer_than_the_servers_starts_over(hub, payload, tmp_path):
    url = _put(hub, "/o/r/resolve/main/w.bin", payload)
    (tmp_path / "w.bin.part").write_bytes(b"x" * (SIZE + 10))  # the file changed on the server
    download_file(url, tmp_path / "w.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert (tmp_path / "w.bin").read_bytes() == payload
    assert [r for _, r in hub.requests] == [f"bytes={SIZE + 10}-", ""]
    # a partial file that is already whole: the 416 answer's length says so, nothing is fetched
    (tmp_path / "w.bin").rename(tmp_path / "w.bin.part")
    download_file(url, tmp_path / "w.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert hub.requests[-1] == ("/o/r/resolve/main/w.bin", f"bytes={SIZE}-")
    assert len(hub.requests) == 3 and (tmp_path / "w.bin").read_bytes() == payload


def test_snapshot_download_uses_the_hub_file_list_and_works_offline_once_done(
        hub, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", hub.url)
    _put(hub, "/o/snap/resolve/main/config.json", b"{}")
    _put(hub, "/o/snap/resolve/main/weights/part-1.bin", os.urandom(3000))
    entry = parse_entry({"name": "snap", "family": "geopixel", "repo": "o/snap",
                         "snapshot": True, "files": []}, "test")
    folder = download_model(entry, tmp_path)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        ".geochat-manifest.json", "config.json", "weights/part-1.bin"]
    assert {c.status for c in verify_model(entry, tmp_path)} == {"ok"}
    hub.api = False  # the hub's API is gone: what is downloaded still counts
    assert download_model(entry, tmp_path) == folder


def test_snapshot_entry_offline_fails_clearly(tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", f"http://127.0.0.1:{port}")
    entry = parse_entry({"name": "g", "family": "geopixel", "repo": "o/g", "snapshot": True,
                         "files": []}, "test")
    with pytest.raises(DownloadError, match="Cannot reach"):
        download_model(entry, tmp_path)


def test_local_entry_is_never_downloaded_nor_removed(tmp_path):
    entry = parse_entry({"name": "l", "family": "geochat", "path": str(tmp_path),
                         "files": ["m.gguf"]}, "test")
    with pytest.raises(ModelError, match="lacks"):
        download_model(entry)
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert download_model(entry) == tmp_path
    assert model_status(entry) == "installed"
    with pytest.raises(ModelError, match="not removed"):
        remove_model(entry)
    assert (tmp_path / "m.gguf").exists()


def test_cli_add_local_folder_is_stored_absolute(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "cfg" / "user.json"
    assert main(["models", "--user-catalog", str(user), "add", "mine", "--family", "geochat",
                 "--path", "mine", "--model-file", "m.gguf"]) == 0
    assert json.loads(user.read_text())["models"][0]["path"] == str(tmp_path / "mine")
    assert main(["models", "--user-catalog", str(user), "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.split("\n", 1)[1])}
    assert rows["mine"]["status"] == "installed"


def test_cli_download_list_verify_remove(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", hub.url)
    model = os.urandom(SIZE)
    _put(hub, "/o/tiny/resolve/main/model.gguf", model)
    user, cache = str(tmp_path / "user.json"), str(tmp_path / "cache")
    base = ["models", "--cache", cache, "--user-catalog", user]
    assert main(base + ["add", "tiny", "--family", "qwen2.5-vl", "--repo", "o/tiny",
                        "--model-file", "model.gguf", "--backend", "llama.cpp"]) == 0
    assert main(base + ["download", "tiny"]) == 0
    out = capsys.readouterr()
    assert "ready in" in out.out and "100%" in out.err
    assert main(base + ["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny"]["status"] == "installed" and rows["geochat-7b"]["status"] == "missing"
    assert main(base + ["verify", "tiny"]) == 0
    assert main(base + ["remove", "tiny"]) == 0
    assert main(base + ["verify", "tiny"]) == 1
    assert "missing" in capsys.readouterr().out
    assert main(base + ["download", "nope"]) == 1
    assert "Unknown model 'nope'" in capsys.readouterr().err
