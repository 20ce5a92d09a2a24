"""Shared test fixtures: paths to the real rasters shipped in tests/data."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def demo_raster() -> Path:
    return DATA_DIR / "cogeo.tif"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random-weight GeoChat as GGUF (model.gguf + mmproj.gguf), built once per session
    with the project's own converter: the same path a real 7B checkpoint takes."""
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    return build_tiny_geochat(tmp_path_factory.mktemp("tiny") / "gguf", "gguf", seed=0)


# --------------------------------------------------------------- a model hub on 127.0.0.1
class HubServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) as ``/REPO/resolve/REV/PATH`` and the hub's file API.

    ``drop_after[path] = n``: the next answer for path sends only n bytes, then closes.
    ``ignore_range``: answer 200 with the whole file even when a Range is asked.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        self.api = True
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        self.auth: list[str] = []  # Authorization headers received
        self.redirects: dict[str, str] = {}  # path -> absolute URL to send the client to

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-answer (cancel, refused size) is expected here

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range", "")))
        srv.auth.append(self.headers.get("Authorization", ""))
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/api/models/") and srv.api:
            repo = self.path[len("/api/models/"):].split("/revision/")[0]
            siblings = [
                {"rfilename": name.split("/resolve/main/")[1], "size": len(data),
                 "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
                for name, data in srv.files.items() if name.startswith(f"/{repo}/resolve/")
            ]
            return self._send(200, json.dumps({"siblings": siblings}).encode())
        data = srv.files.get(self.path)
        if data is None:
            return self._send(404, b"not found")
        start = 0
        header = self.headers.get("Range")
        if header and not srv.ignore_range:
            start = int(header.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.drop_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_hub():
    """A HubServer on 127.0.0.1 in a thread, for as long as the fixture lives."""
    server = HubServer()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


hub = pytest.fixture(serve_hub)
cdn = pytest.fixture(serve_hub)


# --------------------------------------------------------------- torch left out by build.py
# Where no CPU build of torch exists for this Python (Debian 13's 3.13: only a CUDA build of
# several GB), build.py leaves torch out and says why here; a test or fixture that then fails on
# `import torch`, here or in a runtime child or CLI it started (whose message says "No module
# named 'torch'" or that the runtime "lacks torch"), is reported as skipped with that reason.
# Anywhere else it stays a failure.
NO_TORCH_REASON = os.environ.get("GEOCHAT_NO_TORCH_REASON", "")
_TORCH_MISSING_TEXT = ("No module named 'torch'", "lacks torch")


def _torch_missing(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "torch":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


if NO_TORCH_REASON:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        if report.failed and call.excinfo is not None and (
                _torch_missing(call.excinfo.value)
                or any(text in str(report.longrepr) for text in _TORCH_MISSING_TEXT)):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"Skipped: needs torch, not installed: {NO_TORCH_REASON}")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(collector):
        outcome = yield
        report = outcome.get_result()
        if report.failed and "No module named 'torch'" in str(report.longrepr):
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0,
                               f"Skipped: needs torch, not installed: {NO_TORCH_REASON}")
