"""The model hub and the user's Hugging Face cache: what a repository holds, what is already here.

``remote_files`` asks the hub's API which commit a revision is and which files (sizes, LFS
sha256) it holds, so every file of one model comes from one commit. ``hf_cache_file`` finds a
file already in huggingface_hub's cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
``~/.cache/huggingface/hub``; CLIP-336 often is, from transformers) through
``huggingface_hub.try_to_load_from_cache``, checked against the expected size and sha256, so it
is linked instead of downloaded again.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ModelError
from .catalog import ModelEntry, ModelFile
from .download import DownloadError, fetch_json, hub_endpoint, sha256_of
from .safe_names import check_hub_name, shown, unsafe_reason

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
SMALL_FILE = 64 << 20  # files this small are hashed to confirm a cache hit without an LFS name


@dataclass(frozen=True)
class RemoteFiles:
    """A repository at one commit: the files to fetch with their sizes and sha256."""

    commit: Optional[str]  # None when the hub could not be asked (catalog data only)
    files: tuple[ModelFile, ...]


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, by its own rules, read now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _json_kind(value: Any) -> str:
    """The JSON name of ``value``'s type, for a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "object", list: "list", str: "text", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


def _byte_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_listing(data: Any, repo: str, url: str) -> tuple[Optional[str], dict[str, ModelFile]]:
    """The commit and the files (by name) of the hub's answer ``data`` for ``repo`` at
    ``url``; ModelError when the answer has the wrong shape or names an unsafe file."""
    def malformed(what: str) -> ModelError:
        return ModelError(
            f"the hub's listing for {repo} at {url} is malformed: {what}. Nothing was "
            "downloaded; the server does not answer as the Hugging Face hub does: check "
            "HF_ENDPOINT (or GEOCHAT_HF_ENDPOINT), or try later.")

    if not isinstance(data, dict):
        raise malformed(f"a JSON {_json_kind(data)} instead of an object")
    commit = data.get("sha")
    if commit is not None and (not isinstance(commit, str) or "/" in commit
                               or unsafe_reason(commit)):
        raise malformed(f"its 'sha' {shown(commit)!r} is not a commit id")
    siblings = data.get("siblings")
    if siblings is None:
        raise malformed("it has no 'siblings' list of files")
    if not isinstance(siblings, list):
        raise malformed(f"'siblings' is a JSON {_json_kind(siblings)}, not a list of files")
    files: dict[str, ModelFile] = {}
    for number, sibling in enumerate(siblings, 1):
        if not isinstance(sibling, dict):
            raise malformed(f"file {number} is a {_json_kind(sibling)}, not an object")
        name = sibling.get("rfilename")
        if not isinstance(name, str):
            raise malformed(f"file {number} has no 'rfilename' text")
        check_hub_name(name, url)
        lfs = sibling.get("lfs") or {}
        if not isinstance(lfs, dict):
            raise malformed(f"the 'lfs' of '{name}' is a {_json_kind(lfs)}, not an object")
        size = sibling["size"] if "size" in sibling else lfs.get("size")
        if size is not None and not _byte_count(size):
            raise malformed(f"the size of '{name}' is {shown(size)!r}, not a byte count")
        sha256 = lfs.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256.match(sha256)):
            raise malformed(f"the sha256 of '{name}' is not 64 hex digits")
        if name in files:
            raise malformed(f"'{name}' is listed twice")
        files[name] = ModelFile(path=name, size=size, approx_size=size, sha256=sha256)
    clash = next((f for f in files for cut in range(len(f)) if f[cut] == "/" and f[:cut] in files),
                 None)
    if clash is not None:
        raise malformed(f"'{clash.rsplit('/', 1)[0]}' is listed both as a file and as a folder")
    return commit, files


def listing(entry: ModelEntry, revision: str, endpoint: Optional[str]
            ) -> tuple[Optional[str], dict[str, ModelFile]]:
    """The hub's commit and files of ``entry`` at ``revision`` (DownloadError when the hub
    cannot be asked, ModelError when its answer is malformed or names an unsafe file)."""
    url = f"{hub_endpoint(endpoint)}/api/models/{entry.repo}/revision/{revision}?blobs=true"
    return parse_listing(fetch_json(url), str(entry.repo), url)


def remote_files(entry: ModelEntry, endpoint: Optional[str] = None,
                 revision: Optional[str] = None) -> RemoteFiles:
    """The files of ``entry`` at ``revision`` (default the catalog's), sizes and sha256 filled
    from the hub's API; DownloadError when the hub lacks a file the catalog lists."""
    revision = revision or entry.revision
    commit, listed = listing(entry, revision, endpoint)
    if entry.snapshot:
        return RemoteFiles(commit, tuple(listed.values()))
    missing = [f.path for f in entry.files if f.path not in listed]
    if missing:
        raise DownloadError(
            f"{entry.repo} at {revision} ({commit or '?'}) has no {', '.join(missing)}, which "
            f"model '{entry.name}' needs. The repository changed or is incomplete on this hub "
            f"({hub_endpoint(endpoint)}); check the repository page, or pin a revision that has "
            "every file in your user catalog."
        )
    merged = []
    for mine in entry.files:
        theirs = listed[mine.path]
        merged.append(replace(mine, size=mine.size or theirs.size,
                              sha256=mine.sha256 or theirs.sha256,
                              approx_size=theirs.size or mine.approx_size))
    return RemoteFiles(commit, tuple(merged))


def _matches(path: Path, item: ModelFile) -> Optional[str]:
    """The file's sha256 when it is ``item`` (size and hash agree), else None."""
    size = path.stat().st_size
    if item.size is not None and size != item.size:
        return None
    blob = Path(os.path.realpath(path)).name
    if _SHA256.match(blob):  # an LFS blob is named by its sha256: no need to read it
        return blob if item.sha256 in (None, blob) else None
    if size > SMALL_FILE:
        return None  # a large file without an LFS name cannot be confirmed cheaply
    digest = sha256_of(path)
    return digest if item.sha256 in (None, digest) else None


def hf_cache_file(repo: str, item: ModelFile, revisions: Sequence[Optional[str]],
                  hf_cache: Optional[Path] = None) -> Optional[tuple[Path, str]]:
    """``(path, sha256)`` of ``item`` in the Hugging Face cache at one of ``revisions``, when it
    is there and is the right file; None otherwise (or without huggingface_hub)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache = Path(hf_cache) if hf_cache else hf_cache_dir()
    if not cache.is_dir():
        return None
    for revision in dict.fromkeys(r for r in revisions if r):
        found = try_to_load_from_cache(repo, item.path, cache_dir=str(cache), revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            digest = _matches(Path(found), item)
            if digest:
                return Path(found), digest
    return None
