"""Messages that name the cause (issue 26 items 9 and 10): a full disk says so with the bytes
free and where, a llama.cpp model added by hand runs with llama.cpp, unreadable parts of answers
are counted, a text file given as masks is called what it is, and an internal error's message
reads as a sentence. Real tmpfs, real hub and chat servers on 127.0.0.1, real CLI processes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hostile
import pyogrio
import pytest
from test_robust_export import _dets

from geochat_qgis.cli import internal_error
from geochat_qgis.core.errors import ExportError
from geochat_qgis.core.export import export_detections

ROOT = Path(__file__).resolve().parents[2]
full_disk = hostile.full_disk


def cli(*args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geochat_qgis", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
@pytest.mark.parametrize("left", [40_000, 300_000])
def test_a_nearly_full_disk_is_named_with_the_bytes_free_and_the_mount(full_disk, suffix, left):
    """GDAL says 'sqlite3_exec(INSERT INTO gpkg_contents...' or 'Cannot write feature'."""
    path = export_detections(_dets(20), full_disk.path / f"cars{suffix}")
    before = full_disk.files()
    stat = os.statvfs(full_disk.path)
    with full_disk.filler.open("wb") as out:  # leave `left` bytes: less than the new file
        out.write(b"\0" * (stat.f_bavail * stat.f_frsize - left))
    with pytest.raises(ExportError) as failed:
        export_detections(_dets(3000), path)
    message = str(failed.value)
    found = re.search(r"the disk is full \(([\d,]+) bytes free on (\S+), less than the file "
                      r"needs\)\. Free some space", message)
    assert found, message
    assert found.group(2) == str(full_disk.path)
    assert int(found.group(1).replace(",", "")) == os.statvfs(full_disk.path).f_bavail * \
        os.statvfs(full_disk.path).f_frsize
    assert "sqlite" not in message and "Cannot write feature" not in message
    assert full_disk.files() == before  # the old file kept, nothing partial left
    full_disk.free()
    assert pyogrio.read_info(path)["features"] == 20


@pytest.mark.slow
def test_a_model_added_for_llama_cpp_is_got_and_runs_with_llama_cpp(hub, tiny_gguf, tmp_path):
    for name in ("model.gguf", "mmproj.gguf"):
        hub.files[f"/me/mine/resolve/main/{name}"] = (tiny_gguf / name).read_bytes()
    env = {k: v for k, v in os.environ.items()
           if k not in ("GEOCHAT_HF_ENDPOINT", "HF_HUB_OFFLINE", "GEOCHAT_USER_CATALOG")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf"))
    models = ["models", "--cache", str(tmp_path / "cache"), "--user-catalog",
              str(tmp_path / "user.json")]
    added = cli(*models, "add", "mine", "--family", "geochat", "--repo", "me/mine",
                "--model-file", "model.gguf", "--mmproj-file", "mmproj.gguf",
                "--backend", "llama.cpp", env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads((tmp_path / "user.json").read_text())["models"][0]["format"] == "gguf"
    got = cli(*models, "get", "mine", env=env)
    assert got.returncode == 0, got.stderr
    assert "(runs with: llama.cpp" in got.stdout and "no backend installed" not in got.stdout
    # an entry written by hand before, without a format, is read the same way
    entry = json.loads((tmp_path / "user.json").read_text())
    del entry["models"][0]["format"]
    (tmp_path / "user.json").write_text(json.dumps(entry))
    again = cli(*models, "get", "mine", env=env)
    assert "(runs with: llama.cpp" in again.stdout, again.stdout + again.stderr


def test_detect_counts_the_answers_with_unreadable_parts(tmp_path, data_dir):
    out = tmp_path / "cars.gpkg"
    text = "<p>car</p> {<10><10><40><40>|<0>} and <p>car</p> {<60><60>"  # cut off mid-box
    with hostile.HostileServer("ok", text=text) as server:
        run = cli("detect", str(data_dir / "RGB.byte.tif"), "--model", "geochat",
                  "--server-url", server.url, "--prompt", "car", "--tile-size", "512",
                  "--overlap", "0", "--quiet", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "note: 4 of 4 answer(s) had parts that could not be read" in run.stderr
    assert "the first, tile r0_c0: output cut off mid-box '{<60><60>' skipped" in run.stderr
    for tile in ("r0_c0", "r0_c1", "r1_c0", "r1_c1"):  # the log names each
        assert f"tile {tile}, prompt 'car': output cut off mid-box" in run.stderr
    assert pyogrio.read_info(out)["features"] > 0  # the readable boxes are kept


def test_a_text_file_given_as_masks_is_called_not_a_npy_file(tmp_path):
    masks = tmp_path / "masks.txt"
    masks.write_text("0 1 1 0\n")
    run = cli("parse", "--family", "geopixel", "--masks", str(masks), stdin="[SEG]")
    assert run.returncode == 1
    assert f"the masks {masks} are not a .npy file (it starts with b'0 1 1 ')" in run.stderr
    assert "pickle" not in run.stderr and "Traceback" not in run.stderr


def test_an_internal_error_says_where_its_traceback_is_in_a_sentence(capsys):
    try:
        raise ValueError("boom")
    except ValueError as exc:
        message = internal_error(exc, verbose=False)
        above = internal_error(exc, verbose=True)
    where = message.split("please report it with its traceback, which is in ")[1]
    assert "ValueError: boom" in Path(where).read_text()
    Path(where).unlink()
    assert "traceback is in" not in message
    assert above.endswith("please report it with the traceback above")
    assert "ValueError: boom" in capsys.readouterr().err
