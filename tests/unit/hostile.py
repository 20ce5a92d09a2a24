"""What goes wrong for real users, made real for tests: a full disk and a hostile OpenAI server.

``full_disk``: a small tmpfs mounted for the test (skipped with the reason where mounting is not
permitted), with ``fill()`` to use up its last byte. ``HostileServer``: a real ``http.server`` on
127.0.0.1 speaking the OpenAI chat API, answering each chat request in the way ``mode`` says
(good answers, HTTP 500, invalid JSON, bodies cut short by Content-Length or chunked streams,
JSON of the wrong shape).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class Disk:
    """A mounted tmpfs of ``size`` bytes at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def fill(self) -> None:
        """Write until the file system has no byte left (ENOSPC)."""
        with self.filler.open("ab", buffering=0) as out:
            for chunk in (65536, 4096, 512, 1):
                try:
                    while out.write(b"\0" * chunk):
                        pass
                except OSError:
                    pass
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def files(self) -> dict[str, bytes]:
        """Every file on the disk but the filler, by name, with its bytes."""
        return {p.name: p.read_bytes() for p in sorted(self.path.iterdir())
                if p.is_file() and p != self.filler}


def mount_tmpfs(path: Path, size: str) -> None:
    """Mount a tmpfs at ``path`` or skip the test saying why."""
    path.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False,
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"a full disk needs a tmpfs mount, which is not permitted here: "
                    f"{run.stderr.strip() or run.returncode}")


@pytest.fixture
def full_disk(tmp_path) -> Iterator[Disk]:
    """A 1 MiB tmpfs for the test; ``fill()`` it to make every later write fail."""
    path = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_tmpfs(path, "1m")
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ----------------------------------------------------------------- an OpenAI server gone wrong
GOOD_MODELS = json.dumps({"object": "list", "data": [{"id": "geochat"}]}).encode()


class HostileServer(ThreadingHTTPServer):
    """OpenAI chat completions on 127.0.0.1 that answer as ``mode`` says.

    Modes: ``ok`` (``text`` as the answer, streamed when asked), ``500``, ``garbage`` (200 with
    a body that is not JSON), ``cut-length`` (Content-Length promises more than is sent),
    ``cut-chunked`` (a chunked event stream that stops half way), ``sse-list`` (events that are
    JSON lists), ``json-list`` (a JSON list instead of a completion). ``fail_from``: requests
    from this number on (0-based) answer 500, the earlier ones as ``mode``; ``fail_image``: the
    request of this number and every later one with the same body (the same tile and prompt)
    answer 500: one tile the server always fails.
    """

    daemon_threads = True

    def __init__(self, mode: str = "ok", text: str = "{<10><10><40><40>|<0>}",
                 models: bytes = GOOD_MODELS) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode, self.text, self.models = mode, text, models
        self.fail_from: int | None = None
        self.fail_image: int | None = None
        self.failing_bodies: set[bytes] = set()
        self.delay = 0.0  # seconds before each chat answer
        self.requests = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up on a cut answer are what these tests are about

    def __enter__(self):
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, self.server.models)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw or b"{}")
        srv = self.server
        with srv.lock:
            number = srv.requests
            srv.requests += 1
            if number == srv.fail_image:
                srv.failing_bodies.add(raw)
            failing = raw in srv.failing_bodies
        time.sleep(srv.delay)
        mode = srv.mode
        if (srv.fail_from is not None and number >= srv.fail_from) or failing:
            mode = "500"
        stream = bool(body.get("stream"))
        if mode == "500":
            return self._send(500, b'{"error": "the model crashed"}')
        if mode == "garbage":
            return self._send(200, b"<html>Service temporarily overloaded</html>")
        if mode == "json-list":
            return self._send(200, b'[{"choices": []}]')
        if mode == "cut-length":
            whole = json.dumps(_completion(srv.text)).encode()
            return self._send(200, whole, cut=len(whole) // 2)
        if mode == "sse-list":
            return self._stream([b"data: [1, 2, 3]\n\n", b"data: [DONE]\n\n"])
        events = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in _events(srv.text)]
        if mode == "cut-chunked":
            return self._stream(events[: max(1, len(events) // 2)], cut=True)
        if stream:
            return self._stream(events + [b"data: [DONE]\n\n"])
        return self._send(200, json.dumps(_completion(srv.text)).encode())

    def _send(self, status: int, body: bytes, cut: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self._hang_up()

    def _stream(self, events: list[bytes], cut: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        if cut:
            return self._hang_up()
        self.wfile.write(b"0\r\n\r\n")

    def _hang_up(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def _completion(text: str) -> dict:
    return {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text) // 4)}}


def _events(text: str) -> list[dict]:
    pieces = [text[i:i + 6] for i in range(0, len(text), 6)] or [""]
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
              for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return events
