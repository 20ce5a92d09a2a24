"""The isolated model runtime: a real child process running real backends.

The child runs the OpenAI-HTTP backend against a streaming chat server on 127.0.0.1 started
here (a generation that takes as long as the test wants), and llama.cpp for model files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

import numpy as np
import psutil
import pytest
from chat_server import serve_chat

from geochat_qgis.client.errors import RuntimeClientError
from geochat_qgis.client.process import ChildProcess, describe_exit
from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions
from geochat_qgis.core.backends.factory import BackendSpec
from geochat_qgis.core.errors import BackendError, Cancelled, GeoChatError, ModelError
from geochat_qgis.core.runtime import protocol
from geochat_qgis.core.runtime.backend import (
    RuntimeSettings,
    SubprocessBackend,
    open_backend,
)

pytestmark = pytest.mark.slow
chat = pytest.fixture(serve_chat)

SETTINGS = RuntimeSettings(python=sys.executable, heartbeat_interval=0.2, heartbeat_timeout=3.0,
                           startup_timeout=60.0, cancel_grace=5.0)
IMAGE = np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3)


@pytest.fixture
def backend(chat):
    spec = BackendSpec("openai", "tiny", "geochat", None,
                       {"base_url": chat.base_url, "retries": 0, "max_in_flight": 1})
    runtime = SubprocessBackend(spec, SETTINGS)
    yield runtime
    runtime.close()


@pytest.fixture(autouse=True)
def no_zombies(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))  # errors.log goes here
    yield
    zombies = [p.pid for p in psutil.Process().children(recursive=True)
               if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


def _assert_reaped(pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # not our child any more: it was waited for
    if psutil.pid_exists(pid):
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def _ask(backend, **options):
    return backend.generate([IMAGE], Conversation.single("what is here?"),
                            GenerateOptions(**options))


def test_generation_streams_tokens_through_the_child(backend, chat):
    pieces: list[tuple[int, str]] = []
    result = _ask(backend, on_token=lambda i, text: pieces.append((i, text)))
    assert result[0].text == "t0 t1 t2 t3 t4"
    assert pieces == [(0, p) for p in chat.tokens]
    assert backend.pid != os.getpid() and psutil.Process(backend.pid).ppid() == os.getpid()
    assert "openai:tiny" in backend.describe()
    assert chat.bodies[0]["messages"]  # the image and prompt reached the server from the child
    pid = backend.pid
    _ask(backend)
    assert backend.pid == pid  # the loaded runtime is reused


def test_sigkill_mid_generation_is_reported_reaped_and_restarted(backend, chat):
    _ask(backend)  # warm: loaded
    chat.tokens, chat.delay = [f"t{i} " for i in range(60)], 0.05
    seen: list[str] = []

    def kill_on_third_token(index: int, text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            os.kill(backend.pid, signal.SIGKILL)

    pid = backend.pid
    with pytest.raises(BackendError, match=r"killed \(SIGKILL\).*next request starts a fresh"):
        _ask(backend, on_token=kill_on_third_token)
    assert 3 <= len(seen) < 60
    _assert_reaped(pid)
    from geochat_qgis.core.deps.diagnostics import errors_log

    assert "killed (SIGKILL)" in errors_log().read_text()  # for "Copy diagnostics"
    chat.tokens, chat.delay = ["ok"], 0.0
    assert _ask(backend)[0].text == "ok"
    assert backend.pid != pid


def test_hung_child_times_out_on_heartbeat_and_is_killed(backend, chat):
    backend.settings = dataclasses.replace(SETTINGS, heartbeat_timeout=1.5)
    chat.tokens, chat.delay = [f"t{i} " for i in range(100)], 0.05
    stopped = []

    def freeze_child(index: int, text: str) -> None:
        if not stopped:
            stopped.append(backend.pid)
            os.kill(backend.pid, signal.SIGSTOP)  # alive but silent: no more heartbeats

    started = time.monotonic()
    with pytest.raises(BackendError, match="stopped answering \\(no heartbeat for 1.5 s\\)"):
        _ask(backend, on_token=freeze_child)
    assert time.monotonic() - started < 20
    _assert_reaped(stopped[0])


def test_cancel_stops_generation_and_keeps_the_runtime(backend, chat):
    _ask(backend)
    pid = backend.pid
    chat.tokens, chat.delay = [f"t{i} " for i in range(100)], 0.05
    token = CancelToken()
    with pytest.raises(Cancelled):
        _ask(backend, cancel=token, on_token=lambda i, t: token.cancel())
    chat.tokens, chat.delay = ["again"], 0.0
    assert _ask(backend)[0].text == "again"
    assert backend.pid == pid  # cancelled cooperatively: same child, model still loaded


def test_truncated_gguf_fails_to_load_with_a_clear_message(tiny_gguf, tmp_path, chat):
    folder = tmp_path / "cut"
    folder.mkdir()
    data = (tiny_gguf / "model.gguf").read_bytes()
    (folder / "model.gguf").write_bytes(data[: int(len(data) * 0.6)])  # a download cut short
    (folder / "mmproj.gguf").write_bytes((tiny_gguf / "mmproj.gguf").read_bytes())
    path = folder / "model.gguf"
    broken = SubprocessBackend(BackendSpec("llama.cpp", str(path), "geochat"), SETTINGS)
    try:
        with pytest.raises(ModelError, match=r"model\.gguf .*truncated.*[Dd]ownload or convert"):
            broken.load()
        assert broken.process.alive  # the child reported it; nothing crashed
    finally:
        broken.close()
    # the parent is unaffected: another runtime works
    good = SubprocessBackend(BackendSpec("openai", "tiny", "geochat", None,
                                         {"base_url": chat.base_url, "retries": 0}), SETTINGS)
    try:
        assert _ask(good)[0].text == "t0 t1 t2 t3 t4"
    finally:
        good.close()


def test_child_exits_when_the_parent_goes_away():
    process = ChildProcess([sys.executable], None, 0.2, 3.0, 60.0)
    process.start()
    assert process.info["pid"] == process.pid
    assert process.request({"op": "ping"})["pong"] is True
    with pytest.raises(RuntimeClientError, match="No model is loaded") as error:
        process.request({"op": "generate", "images": [], "conversation": {"turns": []},
                         "options": {}})
    assert error.value.kind == "BackendError" and not error.value.crashed
    process.proc.stdin.close()  # as when QGIS dies: the child's stdin ends
    assert process.proc.wait(timeout=30) == 0


def test_runtime_that_cannot_start_says_how_to_fix_it(tmp_path):
    runtime = SubprocessBackend(BackendSpec("openai", "m"),
                                RuntimeSettings(python=str(tmp_path / "no-python")))
    with pytest.raises(BackendError, match="Could not start the GeoChat runtime.*deps install"):
        runtime.load()


def test_exit_descriptions():
    assert "out-of-memory" in describe_exit(-signal.SIGKILL)
    assert "crashed (SIGSEGV) in native code" in describe_exit(-signal.SIGSEGV)
    assert describe_exit(3) == "exited with code 3"


def test_protocol_round_trips(tmp_path):
    from PIL import Image

    assert np.array_equal(protocol.decode_image(protocol.encode_array(IMAGE)), IMAGE)
    masks = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
    assert np.array_equal(protocol.decode_image(protocol.encode_array(masks)), masks)
    Image.fromarray(IMAGE).save(tmp_path / "tile.png")
    assert np.array_equal(protocol.decode_image({"path": str(tmp_path / "tile.png")}), IMAGE)
    conversation = Conversation.single("q", "qwen2.5-vl")
    conversation.turns[0].assistant = "a"
    again = protocol.decode_conversation(json.loads(json.dumps(
        protocol.encode_conversation(conversation))))
    assert again.pairs() == [("q", "a")] and again.family == "qwen2.5-vl"
    assert isinstance(protocol.decode_error({"error": "ModelError", "message": "m"}), ModelError)
    assert isinstance(protocol.decode_error({"error": "Cancelled", "message": "c"}), Cancelled)
    odd = protocol.decode_error({"error": "KeyError", "message": "'x'"})
    assert type(odd) is BackendError and "KeyError" in str(odd)
    assert isinstance(odd, GeoChatError)


def test_open_backend_chooses_the_runtime():
    spec = BackendSpec("openai", "m")
    assert isinstance(open_backend(spec, "subprocess"), SubprocessBackend)
    assert open_backend(spec, "inprocess").name == "openai"
    with pytest.raises(BackendError, match="Unknown runtime"):
        open_backend(spec, "thread")


def test_sigkill_during_detect_keeps_finished_tiles(chat, demo_raster, tmp_path, capsys):
    import geopandas

    from geochat_qgis.cli import main

    chat.tokens = ["{<10><10><40><40>|<0>}"]
    killed: list[int] = []

    def kill_runtime_on_fourth_tile(count: int) -> None:
        if count == 4:
            for child in psutil.Process().children():
                if "runtime" in child.cmdline():
                    killed.append(child.pid)
                    child.send_signal(signal.SIGKILL)  # not waited for here: the parent reaps

    chat.on_request = kill_runtime_on_fourth_tile
    output = tmp_path / "cars.gpkg"
    code = main(["detect", str(demo_raster), "--tile-size", "256", "--overlap", "0",
                 "--prompt", "car", "--backend", "openai", "--server-url", chat.base_url,
                 "--model", "tiny", "--max-in-flight", "1", "--runtime", "subprocess",
                 "--quiet", "-o", str(output)])
    err = capsys.readouterr().err
    assert len(killed) == 1
    assert "killed (SIGKILL)" in err  # the failed tile says what happened
    assert code == 1  # a tile failed (the CLI's exit rule), the others are written
    found = geopandas.read_file(output)
    assert 3 <= len(found) < 16  # the tiles before the kill (and after the restart) are kept
    _assert_reaped(killed[0])


def test_tiny_gguf_generates_the_same_through_the_child_as_in_process(tiny_gguf):
    spec = BackendSpec("llama.cpp", str(tiny_gguf), "geochat", None, {"n_threads": 1})
    image = np.random.default_rng(1).integers(0, 255, (504, 504, 3), dtype=np.uint8)
    conversation = Conversation.single("[refer] Give me the location of <p> car </p>")
    pieces: list[str] = []
    with SubprocessBackend(spec, SETTINGS) as child:
        remote = child.generate([image], conversation, GenerateOptions(
            max_new_tokens=12, on_token=lambda i, text: pieces.append(text)))[0]
        assert child.pid != os.getpid() and "model.gguf" in child.describe()
    with open_backend(spec, "inprocess") as local:
        here = local.generate([image], conversation, GenerateOptions(max_new_tokens=12))[0]
    assert remote.text == here.text and remote.generated_tokens == here.generated_tokens > 0
    assert remote.prompt_tokens == here.prompt_tokens > 1296  # the 504 px image's tokens
    assert "".join(pieces).strip() == remote.text.strip()
