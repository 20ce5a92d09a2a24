"""Two runs writing the same output (issue 26, item 2): one run writes an output at a time, each
run checkpoints its finished tiles in a file of its own, and a killed run keeps exactly its own
finished tiles.

Real runtime children (the project's .venv Python) run real jobs against the streaming chat
server on 127.0.0.1, and are killed with SIGKILL mid-run; the locks are tried from real
processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyogrio
import pytest
from chat_server import serve_chat

from geochat_qgis.client import RuntimeClient, RuntimeClientError
from geochat_qgis.core.errors import ExportError, GeoChatError, ModelError
from geochat_qgis.core.jobs import build_job
from geochat_qgis.core.outputs import OutputBusy, hold_output
from geochat_qgis.core.runtime.checkpoint import Checkpoint, checkpoint_path
from geochat_qgis.core.runtime.job_ops import recover
from geochat_qgis.core.weights.locks import exclusive

pytestmark = pytest.mark.slow
chat = pytest.fixture(serve_chat)
ROOT = Path(__file__).resolve().parents[2]
BOX = "{<10><10><40><40>|<0>}"


@pytest.fixture
def clients(tmp_path, monkeypatch):
    """Two runtime clients, each with its own child: two QGIS, or QGIS and a script."""
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    made = [RuntimeClient(python=sys.executable, heartbeat_interval=0.2, heartbeat_timeout=60)
            for _ in range(2)]
    yield made
    for client in made:
        client.close()


def request(chat, raster, output: Path) -> dict:
    return {"raster": str(raster), "task": "refer", "prompts": ["car"],
            "model": {"backend": "openai", "server_url": chat.base_url, "server_model": "tiny",
                      "max_in_flight": 1, "settings": {"retries": 0}},
            "tiling": {"tile_size": 256, "overlap": 0}, "output": {"path": str(output)}}


def count(path) -> int:
    return int(pyogrio.read_info(str(path))["features"])


def hidden(folder: Path) -> list[str]:
    """Checkpoints, locks and temporary files left beside the outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_second_run_on_the_same_output_is_refused_and_a_killed_first_keeps_its_tiles(
        clients, chat, demo_raster, tmp_path):
    first, second = clients
    out = tmp_path / "cars.gpkg"
    chat.tokens = [BOX]
    first.ping()
    victim = first.pid
    refused: list[str] = []

    def on_request(number: int) -> None:
        if number == 3:  # the first run is going: a second one asks for the same output
            try:
                second.run(request(chat, demo_raster, out))
            except RuntimeClientError as exc:
                refused.append(f"{exc.kind}: {exc.message}")
        if number == 6:
            os.kill(victim, signal.SIGKILL)

    chat.on_request = on_request
    result = first.run(request(chat, demo_raster, out))
    assert refused and refused[0].startswith(
        f"OutputBusy: {out} is being written by another run (pid {victim}); pick another output or wait")
    assert len(chat.bodies) >= 6 and second.pid is not None  # it asked no tile of the server
    assert result.crashed and "next request starts a fresh runtime" in result.error
    assert 4 <= result.tiles_done <= 6 and result.output == str(out)
    assert count(out) == result.features == result.tiles_done  # "kept" is true, and exact
    assert hidden(tmp_path) == []


def _run_and_kill(run_request: dict, after: int) -> int:
    """Run ``run_request`` in a runtime child of its own (the protocol spoken here, so nothing
    recovers it behind the test's back) and SIGKILL the child once ``after`` tiles are done;
    returns the tiles its last progress event counted."""
    child = subprocess.Popen([sys.executable, "-m", "geochat_qgis", "runtime", "serve"],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    done, deadline = 0, time.monotonic() + 120
    try:
        child.stdin.write(json.dumps({"id": 1, "op": "run", "request": run_request}) + "\n")
        child.stdin.flush()
        while done < after and time.monotonic() < deadline:
            message = json.loads(child.stdout.readline())
            assert message.get("type") != "error" and message.get("type") != "result", message
            event = message.get("event") or {}
            if event.get("type") == "progress":
                done = event["done"]
    finally:
        child.kill()
        child.wait()
    assert done >= after
    return done


def test_a_killed_run_keeps_its_own_tiles_when_another_run_finished_the_output_meanwhile(
        clients, chat, demo_raster, tmp_path):
    """The reported loss: the run that ends first must not delete or overwrite the killed
    run's checkpoint. The killed run is recovered after another run wrote the whole output:
    its own finished tiles, all of them, go beside it."""
    out = tmp_path / "cars.gpkg"
    chat.tokens, chat.delay = [BOX], 0.1  # 16 tiles take longer than reading 4 progresses
    killed = {**request(chat, demo_raster, out), "options": {"run_id": "killed-run"}}
    finished = _run_and_kill(killed, after=4)
    other = clients[0].run(request(chat, demo_raster, out))
    assert other.complete and other.features == 16 and count(out) == 16
    found = recover(killed, None)
    assert found["output"] == str(tmp_path / "cars-partial-killed-run.gpkg")
    assert finished <= found["tiles_done"] < 16 and found["run_id"] == "killed-run"
    assert count(found["output"]) == found["features"] == found["tiles_done"]
    assert count(out) == 16 and hidden(tmp_path) == []


def test_run_ids_name_files_and_are_checked(chat, demo_raster, tmp_path):
    bad = {**request(chat, demo_raster, tmp_path / "o.gpkg"), "options": {"run_id": "../../x"}}
    with pytest.raises(GeoChatError, match=r"run id '\.\./\.\./x' is not letters"):
        build_job(bad)
    with pytest.raises(GeoChatError, match="run id"):
        recover(bad, None)
    with pytest.raises(GeoChatError, match="recover needs the killed run's options.run_id"):
        recover(request(chat, demo_raster, tmp_path / "o.gpkg"), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_never_writes_over_another_runs_checkpoint(tmp_path):
    path = checkpoint_path(tmp_path / "cars.gpkg", "run1")
    assert path.name == ".cars.gpkg.run1.partial.jsonl"
    kept = Checkpoint(path, {"run_id": "run1"})
    with pytest.raises(ExportError, match="already holds the finished tiles of a run with the id"):
        Checkpoint(path, {"run_id": "run1"})
    assert path.read_text() == '{"header":{"run_id":"run1"}}\n'
    kept.close()
    assert not path.exists()


HOLDER = """
import sys, time
from pathlib import Path
from geochat_qgis.core.outputs import hold_output
from geochat_qgis.core.weights.locks import exclusive
with hold_output(Path(sys.argv[1])), exclusive(Path(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_locks_name_the_holder_and_die_with_it(tmp_path):
    out, model = tmp_path / "cars.gpkg", tmp_path / "models" / "m"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(model)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputBusy, match=rf"cars.gpkg is being written by another run "
                                             rf"\(pid {holder.pid}\)"):
            hold_output(out)
        with pytest.raises(ModelError, match="m is being got"), exclusive(model):
            pass
    finally:
        holder.kill()
        holder.wait()
    with hold_output(out), exclusive(model):  # the system released them with the process
        assert (tmp_path / ".cars.gpkg.lock").read_text() == f"{os.getpid()}\n"
    assert hidden(tmp_path) == [] and sorted(p.name for p in (tmp_path / "models").iterdir()) == []
