"""Shared test fixtures: paths to the real rasters shipped in tests/data."""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
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


# --------------------------------------------------------------- tests that need torch
# A test that exercises torch by design carries @pytest.mark.needs_torch, or is named by
# TORCH_BY_DESIGN: a file pattern (where torch is missing the whole file is one skip, never
# imported) or ``file::test`` pattern (the marker is added here). A marked test is skipped with
# the reason where torch is missing. Nothing else is turned into a skip: a test that starts
# needing torch by accident fails on `import torch` like any other error. Which Python counts:
# the runtime child's (GEOCHAT_RUNTIME_PYTHON, the qgis tier) when set, else this one. build.py
# says why it left torch out in GEOCHAT_NO_TORCH_REASON.
TORCH_BY_DESIGN = (
    "test_geopixel_*.py",  # GeoPixel runs the project's own torch code
    "test_backend_geopixel.py", "test_cli_segment.py",  # ... behind its backend and the CLI
    "test_models_get_geopixel.py",  # ... and converts its checkpoint with torch
    "test_backend_transformers.py",  # the transformers backend
    "test_convert_hf_transformers.py",  # the converted HF folder loaded and run by transformers
    "test_convert_parity.py",  # ... against llama.cpp
    "test_torch_parity.py",  # the numpy checkpoint reader and writer against torch itself
    "test_dock_geopixel.py", "test_processing_segment.py",  # qgis tier: GeoPixel in the runtime
    "test_processing.py::test_describe_with_the_transformers_backend",  # ... transformers there
)
NO_TORCH_REASON = os.environ.get("GEOCHAT_NO_TORCH_REASON", "")


@functools.lru_cache(maxsize=None)
def torch_missing() -> str:
    """Why torch cannot be imported where the tests run models ('' when it can)."""
    runtime = os.environ.get("GEOCHAT_RUNTIME_PYTHON")
    if runtime:
        found = subprocess.run([runtime, "-c", "import importlib.util as u; print(bool(u.find_spec('torch')))"],
                               capture_output=True, text=True).stdout.strip() == "True"
        where = f"the runtime Python {runtime}"
    else:
        found = importlib.util.find_spec("torch") is not None
        where = "this Python"
    if found:
        return ""
    return f"needs torch, not installed in {where}" + (f": {NO_TORCH_REASON}" if NO_TORCH_REASON else "")


def _torch_by_design(path: Path, test: str = "") -> bool:
    name = f"{path.name}::{test}" if test else path.name
    return any(fnmatch.fnmatch(name, pattern) for pattern in TORCH_BY_DESIGN if ("::" in pattern) == bool(test))


class _TorchlessModule(pytest.Module):
    """A TORCH_BY_DESIGN file where torch is missing: one skip with the reason, not imported."""

    def collect(self):
        pytest.skip(torch_missing(), allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if _torch_by_design(Path(module_path)) and torch_missing():
        return _TorchlessModule.from_parent(parent, path=Path(module_path))
    return None


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        path = Path(str(item.path))
        if _torch_by_design(path) or _torch_by_design(path, getattr(item, "originalname", item.name)):
            item.add_marker(pytest.mark.needs_torch)


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("needs_torch") and torch_missing():
        pytest.skip(torch_missing())
