"""Models on disk: download a catalog entry's files, verify them, report status, remove them.

Each downloaded model lives in ``<cache>/models/<name>/`` with a manifest
(``.geochat-manifest.json``) recording every file's size and sha256 as downloaded, so
``verify`` can detect later corruption even where the catalog has no checksum.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from ..cancel import CancelToken
from ..errors import ModelError
from .catalog import ModelEntry, ModelFile, PathLike
from .download import (
    PART_SUFFIX, DownloadError, ProgressFn, check_free_space, download_file, file_url, sha256_of,
)
from .hub import hf_cache_file, listing
from .safe_names import inside

MANIFEST = ".geochat-manifest.json"


@dataclass(frozen=True)
class FileCheck:
    """Result of verifying one file: status is ok, missing, size-mismatch, sha256-mismatch or
    unverified (present, but no checksum to compare with)."""

    path: str
    status: str
    detail: str = ""


def hub_files(entry: ModelEntry, endpoint: Optional[str] = None) -> list[ModelFile]:
    """The repository's file list with sizes and LFS sha256 from the hub API (DownloadError if
    the API cannot be reached, ModelError if its answer is malformed or names an unsafe file)."""
    return list(listing(entry, entry.revision, endpoint)[1].values())


def resolve_files(entry: ModelEntry, endpoint: Optional[str] = None) -> list[ModelFile]:
    """The files to fetch: the catalog's, with missing sizes/checksums filled from the hub API
    when it answers; a snapshot entry takes the repository's whole file list."""
    needs_api = entry.snapshot or any(f.sha256 is None or f.size is None for f in entry.files)
    if not needs_api:
        return list(entry.files)
    try:
        remote = {f.path: f for f in hub_files(entry, endpoint)}
    except DownloadError:
        if entry.snapshot:
            raise
        return list(entry.files)
    listed = {f.path: f for f in entry.files}
    names = list(remote) if entry.snapshot else list(listed)
    merged = []
    for name in names:
        mine, theirs = listed.get(name), remote.get(name)
        if mine is None:
            merged.append(theirs)
        elif theirs is None:
            merged.append(mine)
        else:
            merged.append(replace(
                mine, size=mine.size or theirs.size, sha256=mine.sha256 or theirs.sha256,
                approx_size=mine.approx_size or theirs.size,
            ))
    return merged


def _read_manifest_data(folder: Path) -> dict:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_manifest(folder: Path) -> dict[str, dict]:
    files = _read_manifest_data(folder).get("files")
    return files if isinstance(files, dict) else {}


def manifest_commit(folder: Path) -> Optional[str]:
    """The hub commit a model folder's files were fetched from (None if unknown)."""
    return _read_manifest_data(folder).get("commit")


def _write_manifest(folder: Path, entry: ModelEntry, files: dict[str, dict],
                    commit: Optional[str] = None) -> None:
    data = {"name": entry.name, "repo": entry.repo, "revision": entry.revision,
            "commit": commit or manifest_commit(folder), "files": files}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, folder / MANIFEST)


def is_complete(folder: Path, item: ModelFile, manifest: dict[str, dict]) -> bool:
    """Whether ``item`` is already in ``folder`` (right size, or recorded in the manifest)."""
    path = folder / item.path
    if not path.is_file():
        return False
    if item.size is not None:  # also accepts files copied in by hand
        return path.stat().st_size == item.size
    return item.path in manifest


def link_file(source: Path, dest: Path) -> None:
    """Put ``source`` at ``dest`` without copying: a symlink, else a hard link, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.symlink(os.path.realpath(source), dest)
        return
    except OSError:
        pass
    try:
        os.link(source, dest)
    except OSError:
        tmp = dest.with_name(dest.name + PART_SUFFIX)
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)


def _targets(entry: ModelEntry, folder: Path, files: Sequence[ModelFile]) -> dict[str, Path]:
    """Where each file goes, every one checked before the first is written: inside ``folder``
    once resolved (the names were checked where they came in; links on the way were not), and
    not the folder's own manifest."""
    if any(item.path == MANIFEST for item in files):
        raise ModelError(f"{entry.name}: a file named {MANIFEST} would replace the model "
                         "folder's own record of its files; refusing to download it.")
    return {item.path: inside(folder, item.path) for item in files}


def fetch_files(
    entry: ModelEntry,
    files: Sequence[ModelFile],
    commit: Optional[str],
    cache: Optional[PathLike] = None,
    endpoint: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional["CancelToken"] = None,
    retries: int = 3,
    hf_cache: Optional[PathLike] = None,
) -> Path:
    """Bring ``files`` of ``entry`` (from ``commit``) into its folder: files already there are
    kept, files in the Hugging Face cache are linked, the rest downloaded (partial ones resumed).

    ``progress(done, total)`` counts bytes over all files. Returns the model folder.
    """
    folder = entry.local_dir(cache)
    targets = _targets(entry, folder, files)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder)
    if commit:
        _write_manifest(folder, entry, manifest, commit)  # pin: a resume takes the same commit
    pending = []
    for item in files:
        if is_complete(folder, item, manifest):
            continue
        hit = hf_cache_file(entry.repo, item, [commit, entry.revision], hf_cache)
        if hit:
            link_file(hit[0], targets[item.path])
            manifest[item.path] = {"size": hit[0].stat().st_size, "sha256": hit[1],
                                   "from": "huggingface-cache"}
            _write_manifest(folder, entry, manifest)
        else:
            pending.append(item)
    total = sum(f.expected_bytes for f in files)
    partial = sum((folder / (f.path + PART_SUFFIX)).stat().st_size
                  for f in pending if (folder / (f.path + PART_SUFFIX)).exists())
    check_free_space(folder, sum(f.expected_bytes for f in pending) - partial)
    offset = total - sum(f.expected_bytes for f in pending)
    for item in pending:
        def file_progress(done: int, _total: Optional[int], base: int = offset) -> None:
            if progress:
                progress(base + done, total or None)

        digest = download_file(
            file_url(entry.repo, commit or entry.revision, item.path, endpoint),
            targets[item.path],
            size=item.size, sha256=item.sha256, progress=file_progress, cancel=cancel,
            retries=retries,
        )
        manifest[item.path] = {"size": (folder / item.path).stat().st_size, "sha256": digest}
        _write_manifest(folder, entry, manifest)
        offset += item.expected_bytes
    if progress:
        progress(total, total or None)
    return folder


def download_model(
    entry: ModelEntry, cache: Optional[PathLike] = None, endpoint: Optional[str] = None,
    progress: Optional[ProgressFn] = None, cancel: Optional["CancelToken"] = None,
    retries: int = 3, hf_cache: Optional[PathLike] = None,
) -> Path:
    """Fetch every file of ``entry`` that is not complete yet; returns the model folder.

    ``progress(done, total)`` counts bytes over all files. Files already present with the right
    size are kept, files in the Hugging Face cache linked, partial ones resumed.
    """
    folder = entry.local_dir(cache)
    if entry.is_local:
        missing = [f.path for f in entry.files if not (folder / f.path).is_file()]
        if missing:
            raise ModelError(f"Model '{entry.name}' points at {folder}, which lacks {missing}.")
        return folder
    try:
        files = resolve_files(entry, endpoint)
    except DownloadError:
        if entry.snapshot and _read_manifest(folder) and model_status(entry, cache) == "installed":
            return folder  # downloaded before; the hub is just unreachable now
        raise
    return fetch_files(entry, files, manifest_commit(folder), cache, endpoint, progress, cancel,
                       retries, hf_cache)


def verify_model(
    entry: ModelEntry, cache: Optional[PathLike] = None, cancel: Optional["CancelToken"] = None,
) -> list[FileCheck]:
    """Check each file's presence, size and sha256 (the catalog's, else the manifest's)."""
    folder = entry.local_dir(cache)
    manifest = _read_manifest(folder)
    names = [f.path for f in entry.files] or list(manifest)
    if not names:
        return [FileCheck(str(folder), "missing", "not downloaded")]
    listed = {f.path: f for f in entry.files}
    checks = []
    for name in names:
        path = folder / name
        known = listed.get(name, ModelFile(path=name))
        recorded = manifest.get(name, {})
        size = known.size or recorded.get("size")
        expected = known.sha256 or recorded.get("sha256")
        if not path.is_file():
            checks.append(FileCheck(name, "missing", "not downloaded"))
        elif size is not None and path.stat().st_size != size:
            checks.append(FileCheck(name, "size-mismatch", f"{path.stat().st_size} != {size} bytes"))
        elif expected is None:
            checks.append(FileCheck(name, "unverified", "no sha256 known"))
        else:
            actual = sha256_of(path, cancel)
            status = "ok" if actual == expected else "sha256-mismatch"
            checks.append(FileCheck(name, status, "" if status == "ok" else f"got {actual}"))
    return checks


def model_status(entry: ModelEntry, cache: Optional[PathLike] = None) -> str:
    """``installed``, ``partial``, ``missing`` (cheap: file presence and sizes only)."""
    folder = entry.local_dir(cache)
    manifest = _read_manifest(folder)
    names = [f.path for f in entry.files] or list(manifest)
    present = [n for n in names if (folder / n).is_file()]
    if names and len(present) == len(names):
        return "installed"
    if present or (folder.exists() and any(folder.rglob(f"*{PART_SUFFIX}"))):
        return "partial"
    return "missing"


def remove_model(entry: ModelEntry, cache: Optional[PathLike] = None) -> int:
    """Delete a downloaded model's folder; returns the bytes freed. Never touches user folders."""
    if entry.is_local:
        raise ModelError(
            f"Model '{entry.name}' lives in your own folder {entry.local_path}; it is not removed. "
            "Delete the folder yourself, or remove the entry from your user catalog."
        )
    folder = entry.local_dir(cache)
    if not folder.exists():
        return 0
    freed = sum(p.stat().st_size for p in folder.rglob("*")
                if p.is_file() and not p.is_symlink() and p.stat().st_nlink == 1)
    shutil.rmtree(folder)
    return freed
