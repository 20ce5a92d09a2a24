"""A server that fails mid-run as vLLM does (issue 23): HTTP 500 with its JSON error body, then
the process gone (connection refused), or a connection closed mid-answer. Real HTTP servers on
127.0.0.1; the message names the server, the status and the body, and points at the server's
log (image size, chat template); run_job keeps the tiles answered before."""
from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hostile
import numpy as np
import pytest

from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.errors import BackendError
from geochat_qgis.core.pipeline import Job, run_job
from geochat_qgis.core.tiling import TileSpec

TILE = np.zeros((32, 32, 3), np.uint8)
BOXES = "<p>car</p> {<10><10><40><40>|<0>}"
# what vLLM 0.32 answers when its engine process died on a request
VLLM_500 = json.dumps({"error": {
    "message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    "type": "InternalServerError", "param": None, "code": 500}}).encode()
HINT = r"server's log.*504 px.*chat template"


class DyingServer(ThreadingHTTPServer):
    """Answers ``good`` chat requests with ``BOXES``, the next with HTTP 500 and ``VLLM_500``,
    then stops listening (later connections are refused). ``mode="drop"``: closes the
    connection without an answer instead of the 500, and serves on."""

    daemon_threads = True

    def __init__(self, good: int, mode: str = "500") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.good, self.mode, self.chats, self.dead = good, mode, 0, False
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address) -> None:
        pass

    def die(self) -> None:
        """Stop listening: the port refuses connections from now on (the serving loop ends
        first, so no connection waits unanswered in the closed socket's queue)."""
        if not self.dead:
            self.dead = True
            self.shutdown()
            self.socket.close()

    def __enter__(self):
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.die()


class _Handler(BaseHTTPRequestHandler):
    server: DyingServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(200, hostile.GOOD_MODELS)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv = self.server
        with srv.lock:
            srv.chats += 1
            number = srv.chats
        if number <= srv.good:
            answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": BOXES},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 1415, "completion_tokens": 9}}
            return self._send(200, json.dumps(answer).encode())
        if srv.mode == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        srv.die()  # the engine process is gone: its answer is the last thing it sends
        self._send(500, VLLM_500)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _ask(url: str, stream: bool = False, retries: int = 2) -> str:
    backend = OpenAIHttpBackend("geochat", settings=HttpSettings(
        base_url=url, retries=retries, backoff=0.01, timeout=10))
    options = GenerateOptions(cancel=CancelToken() if stream else None)
    with backend:
        return backend.generate([TILE], Conversation.single("car?"), options)[0].text


def test_a_500_names_the_server_the_status_the_body_and_the_log():
    with DyingServer(good=0) as server:
        with pytest.raises(BackendError) as failure:
            _ask(server.url, retries=0)
    message = str(failure.value)
    assert server.url in message and "HTTP 500: EngineCore encountered an issue" in message
    assert "(InternalServerError)" in message and "{" not in message  # the body's message
    assert re.search(HINT, message)


def test_a_500_then_connection_refused_says_both():
    """vLLM's engine dies on the request: the retries find no server; the message keeps the
    500 and its body (not only 'connection refused. Is the server running?')."""
    with DyingServer(good=0) as server:
        with pytest.raises(BackendError, match=(
                r"connection refused, after the server failed \(HTTP 500: EngineCore encountered "
                rf"an issue.*\): it has stopped\. .*{HINT}.*restart it.*after 3 tries")):
            _ask(server.url)
        assert server.chats == 1


def test_a_server_that_stops_between_tiles_says_it_stopped():
    with DyingServer(good=1) as server:
        backend = OpenAIHttpBackend("geochat", settings=HttpSettings(
            base_url=server.url, retries=0, timeout=10))
        with backend:
            backend.generate([TILE], Conversation.single("car?"), GenerateOptions())
            server.die()
            with pytest.raises(BackendError, match="connection refused. The server answered "
                                                   "before and has stopped: check its log"):
                backend.generate([TILE], Conversation.single("car?"), GenerateOptions())


def test_a_connection_closed_without_an_answer_points_at_the_log():
    with DyingServer(good=0, mode="drop") as server:
        with pytest.raises(BackendError, match=rf"{server.url} dropped the connection without "
                                               rf"an answer.*{HINT}.*after 2 tries"):
            _ask(server.url, retries=1)
        assert server.chats == 2  # retried


@pytest.mark.parametrize("mode, stream, said", [
    ("cut-length", False, "was cut off"),
    ("cut-chunked", True, "stopped before its end"),
])
def test_an_answer_cut_mid_way_points_at_the_log(mode, stream, said):
    with hostile.HostileServer(mode, text="a long answer " * 20) as server:
        with pytest.raises(BackendError, match=rf"{server.url}.*{said}.*{HINT}"):
            _ask(server.url, stream=stream)


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_run_job_keeps_the_tiles_answered_before_the_server_died(data_dir, mode):
    with DyingServer(good=3, mode=mode) as server:
        backend = OpenAIHttpBackend("geochat", settings=HttpSettings(
            base_url=server.url, max_in_flight=1, retries=1, backoff=0.01, timeout=10))
        with backend:
            result = run_job(Job(raster=str(data_dir / "RGB.byte.tif"), prompts=["car"],
                                 tile_spec=TileSpec(tile_size=256, overlap=0)), backend)
    assert result.tiles_done == 3 and len(result.detections) == 3 and not result.complete
    assert server.url in result.error and "server's log" in result.error
    if mode == "500":
        assert "HTTP 500: EngineCore encountered an issue" in result.error
        assert "HTTP 500: EngineCore" in result.failures[0].message
