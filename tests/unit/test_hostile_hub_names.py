"""A hostile model hub (tests/conftest.py's HubServer on 127.0.0.1) cannot write outside the
model's folder, and a listing of the wrong shape is named as such (issue 26, items 1 and 8).

The built-in GeoPixel entries take the hub's whole listing, so the hub alone chooses the file
names: every name from outside (listing, catalog, revision, run id) is checked before it touches
the disk, and the path about to be written is checked once more after resolving links.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.weights.catalog import Catalog, load_catalog, parse_entry
from geochat_qgis.core.weights.get import get_model
from geochat_qgis.core.weights.safe_names import unsafe_reason
from geochat_qgis.core.weights.store import download_model

ROOT = Path(__file__).resolve().parents[2]
REPO = "MBZUAI/GeoPixel-7B-RES"
MODEL = "geopixel-7b-res"  # the built-in entry of the report
SNAPSHOT = Catalog([parse_entry({"name": MODEL, "family": "geopixel", "repo": REPO,
                                 "format": "hf-custom-code", "backends": ["geopixel"],
                                 "snapshot": True}, "test")])
PRECIOUS = b"the user's own file"
HOSTILE = [
    "../../../../elsewhere/x", "/tmp/geochat-hostile-x", "sub/../../x", "..\\..\\x", "C:/x",
    "c:x", "CON", "nul.txt", "sub/COM1.bin", "LPT9", "aux .json", "a//b", "./a", "a/./b",
    "a/", "", "x\x00y", "x\ny", "x\x1b[2J", "a.bin.", "a.bin ", "a:stream", "a|b", "a*b",
    "x" * 256,
]
SAFE = ["config.json", ".gitattributes", "sub/model-00001-of-00002.safetensors",
        "tokenizer/vocab.txt", "con_fig.json", "console.txt", "COM10", "a..b"]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache four folders down, with a file of the user's where ``../../../../`` lands and
    another one the absolute name would overwrite."""
    folder = tmp_path / "home" / "a" / "b" / "cache"
    folder.mkdir(parents=True)
    (tmp_path / "home" / "elsewhere").mkdir()
    (tmp_path / "home" / "elsewhere" / "x").write_bytes(PRECIOUS)
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _serve(hub, names: list[str]) -> None:
    hub.files[f"/{REPO}/resolve/main/config.json"] = b"{}"
    for name in names:
        hub.files[f"/{REPO}/resolve/main/{name}"] = b"written by the hub"


def _api_path() -> str:
    return f"/api/models/{REPO}/revision/main?blobs=true"


def _listing_url(hub) -> str:
    return hub.url + _api_path()


def _answer_listing(hub, body: bytes) -> None:
    """The hub's API answers ``body`` for the repository (sent there by a redirect)."""
    hub.redirects[_api_path()] = f"{hub.url}/raw/listing"
    hub.files["/raw/listing"] = body


def _hf_cache(folder: Path) -> Path:
    """A Hugging Face cache holding a snapshot of the repository (so huggingface_hub's lookup
    is reached for every listed name)."""
    repo = folder / f"models--{REPO.replace('/', '--')}"
    commit = "e" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    blob = repo / "blobs" / hashlib.sha256(b"{}").hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(b"{}")
    (repo / "snapshots" / commit / "config.json").symlink_to(blob)
    return folder


def _models_get(hub, cache: Path, hf: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m geochat_qgis models --cache CACHE get geopixel-7b-res`` against ``hub``,
    with the built-in catalog only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GEOCHAT_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(hf), PYTHONPATH=str(ROOT),
               GEOCHAT_USER_CATALOG=str(tmp_path / "no-user-catalog.json"))
    return subprocess.run([sys.executable, "-m", "geochat_qgis", "models", "--cache", str(cache),
                           "get", MODEL], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("with_hf_cache", [False, True], ids=["no-hf-cache", "hf-cache"])
@pytest.mark.parametrize("name", ["../../../../elsewhere/x", "ABSOLUTE"])
def test_models_get_refuses_a_listing_that_leaves_the_cache(hub, cache, tmp_path, name,
                                                             with_hf_cache):
    """The reported case, through the command line: exit 1 with the refusal, no traceback,
    the user's file unchanged and nothing written anywhere."""
    outside = tmp_path / "home" / "elsewhere" / "x"
    name = str(outside) if name == "ABSOLUTE" else name
    _serve(hub, [name])
    hf = _hf_cache(tmp_path / "hf") if with_hf_cache else tmp_path / "hf"
    before = _files(tmp_path / "home")
    run = _models_get(hub, cache, hf, tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert (f"error: the hub's listing names an unsafe file path '{name}' (" in run.stderr
            and f"refusing to download from {_listing_url(hub)}" in run.stderr), run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    assert outside.read_bytes() == PRECIOUS
    assert _files(tmp_path / "home") == before  # nothing written, in the cache or outside
    assert [p for p, _ in hub.requests if "/resolve/" in p] == []  # no file was fetched


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(n)[:30] for n in HOSTILE])
def test_every_unsafe_name_is_refused_before_anything_is_written(hub, cache, tmp_path, name):
    name = str(tmp_path / "abs-x") if name.startswith("/") else name
    _serve(hub, [name])
    with pytest.raises(ModelError) as refused:
        get_model(MODEL, cache=cache, endpoint=hub.url, hf_cache=_hf_cache(tmp_path / "hf"),
                  catalog=SNAPSHOT)
    message = str(refused.value)
    assert message.startswith("the hub's listing names an unsafe file path '")
    assert f"({unsafe_reason(name)}): refusing to download from {_listing_url(hub)}" in message
    assert not (cache / "models").exists() and not (tmp_path / "abs-x").exists()
    with pytest.raises(ModelError, match="unsafe file path"):  # `models download`'s path
        download_model(SNAPSHOT.get(MODEL), cache, hub.url)
    assert not (cache / "models").exists()


def test_the_built_in_entry_checks_the_whole_listing(hub, cache, tmp_path):
    """Whether the built-in entry lists its files or takes the hub's: the listing is refused."""
    _serve(hub, ["../../../../elsewhere/x"])
    with pytest.raises(ModelError, match="unsafe file path '../../../../elsewhere/x'"):
        get_model(MODEL, cache=cache, endpoint=hub.url, hf_cache=tmp_path / "hf",
                  catalog=load_catalog(include_user=False))
    assert (tmp_path / "home" / "elsewhere" / "x").read_bytes() == PRECIOUS


def test_names_that_stay_inside_are_taken():
    assert [unsafe_reason(n) for n in SAFE] == [None] * len(SAFE)
    assert all(unsafe_reason(n) for n in HOSTILE)
    assert unsafe_reason(None) and unsafe_reason(["a"])


def test_a_link_on_the_way_out_is_caught_after_resolving(hub, cache, tmp_path):
    """Safe names, but the model's folder holds a link to elsewhere: the resolved path is
    checked before the first byte is written."""
    folder = cache / "models" / MODEL
    folder.mkdir(parents=True)
    (folder / "sub").symlink_to(tmp_path / "home" / "elsewhere", target_is_directory=True)
    _serve(hub, ["sub/x"])
    with pytest.raises(ModelError, match=r"refusing to write 'sub/x': it resolves to .*"
                                         r"elsewhere/x, outside the model's folder"):
        get_model(MODEL, cache=cache, endpoint=hub.url, hf_cache=tmp_path / "hf",
                  catalog=SNAPSHOT)
    assert (tmp_path / "home" / "elsewhere" / "x").read_bytes() == PRECIOUS
    assert not (folder / "config.json").exists()  # checked before the first file, too


@pytest.mark.parametrize("field, value, message", [
    ("files", ["..\\evil.bin"], "file path '..\\evil.bin' is unsafe (it holds a backslash"),
    ("files", ["weights/CON.bin"], "'CON.bin' is a Windows device name"),
    ("files", [{"path": "C:/Windows/x.dll"}], "it starts with a drive letter"),
    ("files", [{"path": 7}], "(it is 7, not a text)"),
    ("name", "nul", "'name' cannot name the model's folder ('nul' is a Windows device"),
    ("repo", "o/../../x", "'repo' must be a hub repository id"),
    ("revision", "../../refs", "'revision' '../../refs' is not a branch, tag or commit"),
])
def test_user_catalog_entries_with_unsafe_names_are_refused(field, value, message):
    raw = {"name": "mine", "family": "geopixel", "repo": "o/mine", "files": ["model.bin"],
           field: value}
    with pytest.raises(ModelError) as refused:
        parse_entry(raw, "user.json")
    assert message in str(refused.value)


MALFORMED = [
    (b"[1, 2, 3]", "a JSON list instead of an object"),
    (b'"hello"', "a JSON text instead of an object"),
    (b"null", "a JSON null instead of an object"),
    (b'{"sha": "abc"}', "it has no 'siblings' list of files"),
    (b'{"siblings": {"config.json": 1}}', "'siblings' is a JSON object, not a list of files"),
    (b'{"siblings": ["config.json"]}', "file 1 is a text, not an object"),
    (b'{"siblings": [{"size": 3}]}', "file 1 has no 'rfilename' text"),
    (b'{"siblings": [{"rfilename": 5}]}', "file 1 has no 'rfilename' text"),
    (b'{"siblings": [{"rfilename": "a", "size": "big"}]}', "the size of 'a' is 'big', not a byte"),
    (b'{"siblings": [{"rfilename": "a", "size": -1}]}', "the size of 'a' is '-1', not a byte"),
    (b'{"siblings": [{"rfilename": "a", "lfs": [1]}]}', "the 'lfs' of 'a' is a list"),
    (b'{"siblings": [{"rfilename": "a", "lfs": {"sha256": "zz"}}]}', "the sha256 of 'a' is not 64"),
    (b'{"siblings": [{"rfilename": "a"}, {"rfilename": "a"}]}', "'a' is listed twice"),
    (b'{"siblings": [{"rfilename": "a"}, {"rfilename": "a/b"}]}', "'a' is listed both as a file"),
    (b'{"sha": ["x"], "siblings": []}', "its 'sha'"),
    (b'{"sha": "../../x", "siblings": []}', "its 'sha' '../../x' is not a commit id"),
]


@pytest.mark.parametrize("body, what", MALFORMED, ids=[b.decode()[:30] for b, _ in MALFORMED])
def test_a_malformed_listing_is_named_with_its_url(hub, cache, body, what):
    _answer_listing(hub, body)
    expected = f"the hub's listing for {REPO} at {_listing_url(hub)} is malformed: {what}"
    for attempt in (lambda: get_model(MODEL, cache=cache, endpoint=hub.url, catalog=SNAPSHOT),
                    lambda: download_model(SNAPSHOT.get(MODEL), cache, hub.url)):
        with pytest.raises(ModelError) as refused:
            attempt()
        assert expected in str(refused.value)
    assert not (cache / "models").exists()


def test_a_malformed_listing_on_the_command_line_is_no_bug_report(hub, cache, tmp_path):
    _answer_listing(hub, json.dumps([{"rfilename": "config.json"}]).encode())
    run = _models_get(hub, cache, tmp_path / "hf", tmp_path)
    assert run.returncode == 1
    assert (f"error: the hub's listing for {REPO} at {_listing_url(hub)} is malformed: a JSON "
            "list instead of an object" in run.stderr), run.stderr
    assert "Traceback" not in run.stderr and "bug" not in run.stderr
