"""The OpenAI HTTP backend against real HTTP servers on 127.0.0.1 that fail in each way a user meets."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.errors import BackendError, Cancelled

TILE = np.zeros((32, 32, 3), np.uint8)


class FailingServer:
    """Answers every POST with ``status`` (or sleeps ``delay`` s first); counts the requests."""

    def __init__(self, status: int, delay: float = 0.0, body: bytes = b'{"error": "nope"}'):
        self.hits = 0
        self.checks = 0
        self.auth: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming): the backend's /models check
                outer.checks += 1
                self.answer()

            def do_POST(self):  # noqa: N802
                outer.hits += 1
                outer.auth.append(self.headers.get("Authorization", ""))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.answer()

            def answer(self):
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _ask(url: str, **settings) -> None:
    backend = OpenAIHttpBackend("geochat-7b", settings=HttpSettings(base_url=url, backoff=0.01,
                                                                       **settings))
    with backend:
        backend.generate([TILE], Conversation.single("What is this?"), GenerateOptions())


def test_401_names_the_api_key_variable():
    with FailingServer(401) as server:
        with pytest.raises(BackendError, match="HTTP 401.*GEOCHAT_API_KEY"):
            _ask(server.url, api_key="wrong")
        assert (server.checks, server.hits) == (1, 0)  # refused at load, before any tile


def test_404_names_url_and_model():
    with FailingServer(404, body=b"model not found") as server:
        with pytest.raises(BackendError, match=r"HTTP 404: model not found.*/v1.*'geochat-7b'"):
            _ask(server.url)
        assert server.hits == 0


def test_500_is_retried_with_backoff_then_reported():
    with FailingServer(500, body=b"CUDA out of memory") as server:
        with pytest.raises(BackendError, match=r"HTTP 500: CUDA out of memory.*after 3 tries"):
            _ask(server.url, retries=2)
        assert server.hits == 3  # the /models check's 500 is only logged; requests retry


def test_refused_connection_says_server_not_running():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BackendError, match=r"connection refused\. Is the server running"):
        _ask(f"http://127.0.0.1:{port}/v1", retries=1)


def test_timeout_names_the_limit():
    with FailingServer(200, delay=1.0) as server:
        with pytest.raises(BackendError, match=r"did not answer within 0.3 s"):
            _ask(server.url, timeout=0.3)


def test_cancel_before_the_request_sends_nothing():
    cancel = CancelToken()
    cancel.cancel()
    with FailingServer(500) as server:
        backend = OpenAIHttpBackend("m", settings=HttpSettings(base_url=server.url))
        with pytest.raises(Cancelled):
            backend.generate([TILE], Conversation.single("hi"), GenerateOptions(cancel=cancel))
        assert server.hits == 0


def test_non_openai_answer_is_explained():
    with FailingServer(200, body=b"<html>hello</html>") as server:
        with pytest.raises(BackendError, match="not an OpenAI chat completion"):
            _ask(server.url)


def test_requests_run_in_parallel_up_to_max_in_flight():
    with FailingServer(503, delay=0.6) as server:
        backend = OpenAIHttpBackend("m", settings=HttpSettings(base_url=server.url, retries=0,
                                                               max_in_flight=4))
        start = time.perf_counter()
        with pytest.raises(BackendError, match="HTTP 503"):
            backend.generate([TILE] * 4, Conversation.single("hi"), GenerateOptions())
        elapsed = time.perf_counter() - start
        backend.close()
        assert server.hits == 4
        assert elapsed < 4 * 0.6  # four requests at once, not one after another
