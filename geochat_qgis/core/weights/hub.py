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
from typing import Optional, Sequence

from .catalog import ModelEntry, ModelFile
from .download import DownloadError, fetch_json, hub_endpoint, sha256_of

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


def _listing(entry: ModelEntry, revision: str, endpoint: Optional[str]) -> tuple[Optional[str], dict]:
    url = f"{hub_endpoint(endpoint)}/api/models/{entry.repo}/revision/{revision}?blobs=true"
    data = fetch_json(url)
    files = {}
    for sibling in data.get("siblings", []):
        lfs = sibling.get("lfs") or {}
        size = sibling.get("size", lfs.get("size"))
        files[sibling["rfilename"]] = ModelFile(
            path=sibling["rfilename"], size=size, approx_size=size, sha256=lfs.get("sha256"))
    return data.get("sha"), files


def remote_files(entry: ModelEntry, endpoint: Optional[str] = None,
                 revision: Optional[str] = None) -> RemoteFiles:
    """The files of ``entry`` at ``revision`` (default the catalog's), sizes and sha256 filled
    from the hub's API; DownloadError when the hub lacks a file the catalog lists."""
    revision = revision or entry.revision
    commit, listed = _listing(entry, revision, endpoint)
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
