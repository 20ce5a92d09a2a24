"""A model hub on 127.0.0.1 that speaks the Hugging Face protocol, serving tiny repositories.

``RepoHub`` holds repositories (files and a commit id each) and answers as huggingface.co does:
``GET /api/models/{repo}/revision/{rev}`` (id, sha, siblings with size, blobId and lfs for
weight files), ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``ETag``, ``X-Repo-Commit``,
``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Accept-Ranges`` and Range answers (206,
416), 404 with ``X-Error-Code`` for a missing repository, revision or file. A request that
comes through it as an HTTP proxy (absolute URL) is answered the same way and recorded.

``tiny_geochat_repos(folder)`` writes a tiny GeoChat laid out as ``MBZUAI/geochat-7B`` (two
``pytorch_model-0000N-of-00002.bin`` shards and their index, ``tokenizer.model``, a config whose
``mm_vision_tower`` is ``openai/clip-vit-large-patch14-336``) and a tiny CLIP-336 laid out as
``openai/clip-vit-large-patch14-336`` (config, preprocessor config, ``pytorch_model.bin``).
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote, urlsplit

GEOCHAT_REPO = "MBZUAI/geochat-7B"
CLIP_REPO = "openai/clip-vit-large-patch14-336"
LFS_SUFFIXES = (".bin", ".safetensors", ".gguf", ".model", ".h5", ".msgpack")


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content (what the hub sends as the ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes] = field(default_factory=dict)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


class RepoHub(ThreadingHTTPServer):
    """The hub: ``repos[name] = Repo(commit, files)``; ``cut_after[(repo, file)] = n`` makes
    the next answer for that file send n bytes and hang up (``cut_always`` for every answer);
    ``stall_after`` sends n bytes then waits for ``release``; ``delay`` waits before answering."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RepoHandler)
        self.repos: dict[str, Repo] = {}
        self.cut_after: dict[tuple[str, str], int] = {}
        self.cut_always: dict[tuple[str, str], int] = {}
        self.delay: dict[tuple[str, str], float] = {}  # seconds before answering for a file
        self.stall_after: dict[tuple[str, str], int] = {}  # send n bytes, then hang until released
        self.release = threading.Event()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.auth: list[str] = []
        self.proxy_auth: list[str] = []  # Proxy-Authorization headers received
        self.proxied: list[str] = []  # absolute URLs received as a proxy
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-answer are part of the tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def weight_requests(self) -> list[tuple[str, str, str]]:
        """Requests for file contents (not the API, not HEAD)."""
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1]]

    def add_folder(self, repo: str, folder: Path, commit: Optional[str] = None) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        commit = commit or hashlib.sha1(repo.encode() + b"".join(files.values())).hexdigest()
        self.repos[repo] = Repo(commit, files)
        return self.repos[repo]


def _range_start(header: Optional[str]) -> int:
    """The first byte a ``Range: bytes=N-`` header asks for (0 without one)."""
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes="):].split("-")[0] or 0)


class _RepoHandler(BaseHTTPRequestHandler):
    server: RepoHub

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        srv = self.server
        path = self.path
        if path.startswith(("http://", "https://")):
            srv.proxied.append(path)
            srv.proxy_auth.append(self.headers.get("Proxy-Authorization", ""))
            parts = urlsplit(path)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        with srv.lock:
            srv.requests.append((self.command, path, self.headers.get("Range", "")))
            srv.auth.append(self.headers.get("Authorization", ""))
        route = urlsplit(path).path
        if route.startswith("/api/models/"):
            return self._api(route[len("/api/models/"):])
        if "/resolve/" in route:
            repo, _, rest = route.lstrip("/").partition("/resolve/")
            revision, _, name = rest.partition("/")
            return self._file(unquote(repo), unquote(revision), unquote(name), head)
        self._error(404, "RepoNotFound", head)

    def _repo(self, name: str, revision: str, head: bool) -> Optional[Repo]:
        repo = self.server.repos.get(name)
        if repo is None:
            self._error(404, "RepoNotFound", head)
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", head)
            return None
        return repo

    def _api(self, rest: str) -> None:
        name, _, revision = rest.partition("/revision/")
        repo = self._repo(unquote(name), unquote(revision or "main"), False)
        if repo is None:
            return
        siblings = []
        for path, data in repo.files.items():
            item = {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
            if repo.is_lfs(path):
                item["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                               "pointerSize": 134}
            siblings.append(item)
        body = json.dumps({"id": name, "modelId": name, "sha": repo.commit,
                           "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, name: str, revision: str, path: str, head: bool) -> None:
        srv = self.server
        repo = self._repo(name, revision, head)
        if repo is None:
            return
        data = repo.files.get(path)
        if data is None:
            return self._error(404, "EntryNotFound", head)
        if not head and (name, path) in srv.delay:
            time.sleep(srv.delay[name, path])
        sha256 = hashlib.sha256(data).hexdigest()
        etag = sha256 if repo.is_lfs(path) else git_blob_sha1(data)
        start = 0 if head else _range_start(self.headers.get("Range"))
        if start >= len(data) > 0:
            return self._unsatisfiable(len(data))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Accept-Ranges", "bytes")
        if repo.is_lfs(path):
            self.send_header("X-Linked-Etag", f'"{sha256}"')
            self.send_header("X-Linked-Size", str(len(data)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        with srv.lock:
            cut = srv.cut_after.pop((name, path), None)
            if cut is None:
                cut = srv.cut_always.get((name, path))
        stall = srv.stall_after.pop((name, path), None)
        if stall is not None:
            cut = stall
        self.wfile.write(body if cut is None else body[:cut])
        if stall is not None:  # a connection that stops sending, as a killed client sees it
            self.wfile.flush()
            srv.release.wait(30)
        if cut is not None:  # hang up half way, as a broken connection does
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _unsatisfiable(self, size: int) -> None:
        self.send_response(416)
        for name, value in (("Content-Range", f"bytes */{size}"), ("Content-Length", "0")):
            self.send_header(name, value)
        self.end_headers()

    def _error(self, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def serve_repo_hub() -> Iterator[RepoHub]:
    """A RepoHub in a thread for as long as the caller's fixture lives."""
    server = RepoHub()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def tiny_geochat_repos(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny GeoChat and CLIP-336 repositories under ``folder``; returns both folders
    (numpy only: the runtime that writes them may have no torch)."""
    from geochat_qgis.core.weights.checkpoint_io import open_tensors
    from geochat_qgis.core.weights.tiny import write_tiny_geochat_checkpoint
    from geochat_qgis.core.weights.torch_zip_writer import save_state_dict

    geochat = write_tiny_geochat_checkpoint(Path(folder) / "geochat-7B", seed)
    clip = Path(folder) / "clip-vit-large-patch14-336"
    (geochat / "clip").rename(clip)
    # the real CLIP-336 repository ships a pickle, not safetensors
    with open_tensors(clip / "model.safetensors") as tensors:
        save_state_dict(tensors, clip / "pytorch_model.bin")
    (clip / "model.safetensors").unlink()
    return geochat, clip


HUB_ENV_DROPPED = ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY",
                   "http_proxy", "https_proxy", "GEOCHAT_USER_CATALOG")


def geochat_hub(tmp_path: Path, monkeypatch,
                repos: Optional[tuple[Path, Path]] = None) -> Iterator[RepoHub]:
    """A fixture body: the tiny GeoChat and CLIP-336 (``repos``, else written now) served as
    MBZUAI/geochat-7B and openai/clip-vit-large-patch14-336 (commits a*40, c*40);
    GEOCHAT_HF_ENDPOINT points at it, GEOCHAT_CACHE (``tmp_path/models``) and HF_HUB_CACHE are
    fresh folders under ``tmp_path``."""
    for name in HUB_ENV_DROPPED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path / "models"))
    geochat, clip = repos or tiny_geochat_repos(tmp_path / "repos")
    generator = serve_repo_hub()
    server = next(generator)
    server.add_folder(GEOCHAT_REPO, geochat, commit="a" * 40)
    server.add_folder(CLIP_REPO, clip, commit="c" * 40)
    monkeypatch.setenv("GEOCHAT_HF_ENDPOINT", server.url)
    try:
        yield server
    finally:
        generator.close()
