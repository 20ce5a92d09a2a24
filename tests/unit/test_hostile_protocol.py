"""A confused pipe: malformed lines to the runtime child, and from it, through real processes.

The child is the real ``python -m geochat_qgis runtime serve`` (or, to make a child write a bad
line, the real server with one extra request: tests/unit/chatty_runtime.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from chat_server import serve_chat

from geochat_qgis.client.errors import RuntimeClientError
from geochat_qgis.client.locate import child_env
from geochat_qgis.client.process import ChildProcess

pytestmark = pytest.mark.slow
chat = pytest.fixture(serve_chat)
CHATTY = Path(__file__).with_name("chatty_runtime.py")
NOT_REQUESTS = ['[1,2,3]', '"hello"', 'null', '42', '{"id":[1]}', '{"id":{"a":1},"op":"ping"}',
                '{"op":"cancel","target":{}}', '{"op":["plan"]}', '{not json']


@pytest.fixture(autouse=True)
def no_zombies(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    yield
    zombies = [p.pid for p in psutil.Process().children(recursive=True)
               if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


@pytest.fixture
def child():
    runtime = ChildProcess([sys.executable], heartbeat_interval=0.2, heartbeat_timeout=6.0,
                           startup_timeout=60.0)
    runtime.start()
    yield runtime
    runtime.stop()


@pytest.fixture
def chatty():
    runtime = ChildProcess([sys.executable, str(CHATTY)], heartbeat_interval=0.2,
                           heartbeat_timeout=6.0, startup_timeout=60.0)
    runtime.start()
    yield runtime
    runtime.stop()


def test_every_line_that_is_not_a_request_gets_an_error_reply_and_the_child_serves_on():
    proc = subprocess.Popen([sys.executable, "-m", "geochat_qgis", "runtime", "serve",
                             "--heartbeat", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert json.loads(proc.stdout.readline())["type"] == "ready"
        for line in NOT_REQUESTS:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            reply = json.loads(proc.stdout.readline())
            assert reply["type"] == "error" and reply["error"] == "BackendError", (line, reply)
            assert "request" in reply["message"], reply
        proc.stdin.write('{"id":7,"op":"ping"}\n')
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"type": "result", "id": 7, "pong": True}
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("op", ["plan", "run", "ask", "recover", "model_status", "check_model",
                                "load", "generate", "export", "get_model"])
def test_a_request_missing_its_fields_is_answered_by_name(child, op):
    with pytest.raises(RuntimeClientError, match=f"Malformed '{op}' request: its '\\w+' is "
                                                 "missing; it must be"):
        child.request({"op": op})
    assert child.alive and child.request({"op": "ping"})["pong"] is True
    assert "Traceback" not in child.stderr_tail(40)


def test_a_request_with_fields_of_the_wrong_type_is_answered_not_crashed(child, chat):
    spec = {"kind": "openai", "model": "tiny", "settings": {"base_url": chat.base_url}}
    assert "openai" in child.request({"op": "load", "spec": spec})["describe"]
    with pytest.raises(RuntimeClientError, match="its 'request' is a list; it must be an object"):
        child.request({"op": "run", "request": [1]})
    with pytest.raises(RuntimeClientError, match="'cancel' request: its 'target' is an object"):
        child.request({"op": "cancel", "target": {}})
    with pytest.raises(RuntimeClientError, match="'generate' request cannot be read"):
        child.request({"op": "generate", "images": [{"raw": "!!"}], "conversation": {},
                       "options": {}})
    with pytest.raises(RuntimeClientError, match="'load' request: its 'spec' does not fit"):
        child.request({"op": "load", "spec": {"nonsense": 1}})
    assert child.request({"op": "ping"})["pong"] is True
    assert "Traceback" not in child.stderr_tail(40)


@pytest.mark.parametrize("bad", ['[1,2,3]', '"hello"', 'null', '{broken json',
                                 '{"type":"result","id":[1]}', '{"type":"event","id":{id},'
                                 '"event":"text"}', '{"type":7,"id":{id}}'])
def test_a_bad_line_from_the_child_fails_the_waiting_request_at_once(chatty, bad):
    pid = chatty.pid
    started = time.monotonic()
    with pytest.raises(RuntimeClientError) as failed:
        chatty.request({"op": "say", "lines": [bad], "wait": 8})
    assert time.monotonic() - started < 3  # not the heartbeat timeout, nor the child's wait
    assert failed.value.kind == "RuntimeProtocol" and not failed.value.crashed
    assert "cannot read" in failed.value.message and bad[:6] in failed.value.message
    assert "out of memory" not in failed.value.message
    # the reader survived: the same child answers, heartbeats still count
    assert chatty.alive and chatty.pid == pid
    assert chatty.request({"op": "say", "lines": [], "wait": 0}) ["said"] == 0
    time.sleep(0.5)
    assert time.monotonic() - chatty.last_seen < 0.5


def test_the_failed_request_is_cancelled_in_the_child(chatty):
    with pytest.raises(RuntimeClientError):
        chatty.request({"op": "say", "lines": ["[1]"], "wait": 30})
    # the light worker is free again at once: the abandoned 'say' was cancelled, not left waiting
    started = time.monotonic()
    assert chatty.request({"op": "say", "lines": [], "wait": 0})["cancelled"] is False
    assert time.monotonic() - started < 3
