"""A small resumable HTTP downloader (urllib only): Range resume, progress, cancel, sha256.

``download_file`` fetches one URL into ``dest`` through ``dest.part``: an interrupted transfer
keeps the partial file and the next attempt (automatic retries, or a later call, even after a
restart) continues it with an HTTP Range request.

Why the project's own client rather than ``huggingface_hub.hf_hub_download``: huggingface_hub
2.x downloads into a process-unique temporary file and deletes it whenever the download fails or
is interrupted (huggingface_hub PR #4228), so a cancelled or killed 10 GB shard starts again from
byte 0. The plugin must resume after a cancel and after a QGIS restart, and report bytes, rate
and time left to its own progress bar. huggingface_hub is still used where it helps and keeps
the user's setup: files already in its cache are reused (``hub.py``), its stored login token is
sent, and the same settings are honoured:

- hub: ``$GEOCHAT_HF_ENDPOINT``, else ``$HF_ENDPOINT``, else https://huggingface.co;
- token: ``$HF_TOKEN``, else the token ``hf auth login`` stored (sent to the hub's host only);
- offline: ``$HF_HUB_OFFLINE=1`` makes every network access a clear DownloadError;
- proxies: ``$HTTPS_PROXY`` / ``$HTTP_PROXY`` (``http://user:password@host:port``) and
  ``$NO_PROXY``, read at each call; QGIS's proxy settings reach the runtime child this way.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote, urlsplit

from ...__about__ import version
from ..cancel import CancelToken
from ..errors import Cancelled, GeoChatError

DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "GEOCHAT_HF_ENDPOINT"
OFFLINE_ENV = "HF_HUB_OFFLINE"
PART_SUFFIX = ".part"
CHUNK_BYTES = 1 << 20
SPACE_MARGIN_BYTES = 64 << 20  # keep this much free beyond the download itself

ProgressFn = Callable[[int, Optional[int]], None]  # (bytes done, total bytes or None)


class DownloadError(GeoChatError):
    """A download failed: offline, not found, refused, disk full, or checksum mismatch."""


class _Interrupted(Exception):
    """The connection broke mid-transfer: retry with Range from the partial file."""


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects (the hub serves large files from a CDN) keeping the Range header, and
    drops the access token when the redirect leaves the hub's host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(new.full_url).netloc != urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _opener() -> urllib.request.OpenerDirector:
    """A fresh opener: proxy variables are read now (the front end may set them late)."""
    return urllib.request.build_opener(urllib.request.ProxyHandler(), _RedirectHandler)


def offline() -> bool:
    """True when $HF_HUB_OFFLINE asks for no network access (huggingface_hub's switch)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _refuse_offline(url: str) -> None:
    if offline():
        raise DownloadError(
            f"Offline mode ({OFFLINE_ENV}=1) forbids fetching {url}. Unset {OFFLINE_ENV} to "
            "download, or copy the files into the model cache (or the Hugging Face cache)."
        )


def hub_endpoint(override: Optional[str] = None) -> str:
    """The model hub's base URL: ``override``, else $GEOCHAT_HF_ENDPOINT, else $HF_ENDPOINT,
    else Hugging Face."""
    chosen = override or os.environ.get(ENDPOINT_ENV) or os.environ.get("HF_ENDPOINT")
    return (chosen or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> Optional[str]:
    """$HF_TOKEN, else the token huggingface_hub stored at login (None without either)."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    try:
        return get_token()
    except Exception:  # a broken token file must not stop public downloads
        return None


def file_url(repo: str, revision: str, path: str, endpoint: Optional[str] = None) -> str:
    """The hub's download URL of one file of a repository at a revision."""
    return f"{hub_endpoint(endpoint)}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"


def _request(url: str, start: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": f"geochat-qgis/{version()}", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    token = hub_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def _http_failure(url: str, exc: urllib.error.HTTPError) -> DownloadError:
    if exc.code == 404:
        return DownloadError(
            f"Not found (HTTP 404): {url}. The repository, revision or file name in the catalog "
            "entry is wrong or the file was moved; check the entry or set GEOCHAT_HF_ENDPOINT."
        )
    if exc.code in (401, 403):
        return DownloadError(
            f"Access refused (HTTP {exc.code}) for {url}: the repository may be gated or private. "
            "Accept its licence on the hub and set HF_TOKEN to an access token."
        )
    return DownloadError(f"The server answered HTTP {exc.code} ({exc.reason}) for {url}; try later.")


def _offline(url: str, exc: BaseException) -> DownloadError:
    return DownloadError(
        f"Cannot reach {url} ({exc}). You seem to be offline or the server is down: connect and "
        "run again (partial files are resumed), or copy the files by hand into the model folder."
    )


def check_free_space(folder: Path, needed: int) -> None:
    """DownloadError when ``folder``'s disk has less than ``needed`` bytes (plus a margin) free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > 0 and free < needed + SPACE_MARGIN_BYTES:
        raise DownloadError(
            f"Not enough free disk space in {folder}: {needed / 1e9:.2f} GB needed, "
            f"{free / 1e9:.2f} GB free. Free some space or choose another cache folder "
            "(GEOCHAT_CACHE or the plugin settings)."
        )


def sha256_of(path: Path, cancel: Optional["CancelToken"] = None) -> str:
    """The hex sha256 of a file, read in chunks (checks ``cancel`` between chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            if cancel is not None and cancel.cancelled:
                raise Cancelled("Checksum verification cancelled.")
            digest.update(chunk)
    return digest.hexdigest()


def fetch_json(url: str, timeout: float = 30.0) -> Any:
    """GET a JSON document (hub API); DownloadError when it cannot be had."""
    _refuse_offline(url)
    try:
        with _opener().open(_request(url), timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise _http_failure(url, exc) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise _offline(url, exc) from exc
    except ValueError as exc:
        raise DownloadError(f"{url} did not return JSON ({exc}).") from exc


def _range_total(value: str) -> Optional[int]:
    """The full length from a Content-Range value (``bytes */N`` or ``bytes A-B/N``)."""
    tail = value.rpartition("/")[2]
    return int(tail) if tail.isdigit() else None


def _range_start(response: http.client.HTTPResponse) -> int:
    """First byte of a 206 answer, from Content-Range ``bytes START-END/TOTAL``."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _transfer(
    url: str, part: Path, size: Optional[int], progress: Optional[ProgressFn],
    cancel: Optional["CancelToken"], timeout: float,
) -> None:
    """One attempt: continue ``part`` from its current length to the end of the file."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    try:
        response = _opener().open(_request(url, have), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            if have == (size or _range_total(exc.headers.get("Content-Range", ""))):
                return  # the partial file is already complete
            part.unlink()  # the partial file does not fit the server's file: start over
            raise _Interrupted(f"HTTP 416 for a {have}-byte partial file") from exc
        raise _http_failure(url, exc) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise _Interrupted(_offline(url, exc)) from exc
    with response:
        length = response.headers.get("Content-Length")
        resumed = response.status == 206 and _range_start(response) == have
        if not resumed:
            have = 0  # the server ignored the Range: start over
        total = have + int(length) if length is not None else size
        if size is not None and total is not None and total != size:
            raise DownloadError(
                f"{url} has {total} bytes but the catalog expects {size}: the file changed on "
                "the server. Update the catalog entry (size and sha256) or pin its revision."
            )
        check_free_space(part.parent, (total or 0) - have)
        done = have
        if progress:
            progress(done, total)
        with open(part, "ab" if resumed else "wb") as handle:
            while True:
                if cancel is not None and cancel.cancelled:
                    raise Cancelled(f"Download cancelled; {done} bytes kept in {part} to resume.")
                try:
                    chunk = response.read1(CHUNK_BYTES)  # what has arrived, up to a chunk
                except (http.client.HTTPException, OSError) as exc:
                    raise _Interrupted(exc) from exc
                if not chunk:
                    break
                handle.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    if total is not None and done < total:
        raise _Interrupted(f"connection closed after {done} of {total} bytes")


def download_file(
    url: str,
    dest: Path,
    *,
    size: Optional[int] = None,
    sha256: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional["CancelToken"] = None,
    retries: int = 3,
    timeout: float = 30.0,
) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); returns the file's sha256.

    Raises DownloadError (offline, 404, refused, disk full, checksum mismatch: the bad file is
    deleted) or Cancelled (the partial file is kept for the next call to resume).
    """
    _refuse_offline(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    if size is not None:
        check_free_space(dest.parent, size - (part.stat().st_size if part.exists() else 0))
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, size, progress, cancel, timeout)
            break
        except _Interrupted as exc:
            if attempt == retries:
                cause = exc.args[0] if isinstance(exc.args[0], DownloadError) else None
                raise cause or DownloadError(
                    f"Download of {url} broke off ({exc.args[0]}). The partial file {part} is "
                    "kept: run the download again to resume it."
                ) from exc
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
    digest = sha256_of(part, cancel)
    if sha256 and digest != sha256.lower():
        part.unlink()
        raise DownloadError(
            f"Checksum mismatch for {dest.name}: expected sha256 {sha256}, got {digest}. The "
            "corrupt file was deleted; run the download again. If it fails again the catalog "
            "entry is out of date with the server."
        )
    os.replace(part, dest)
    return digest

