"""What a failed file write says: the disk full (with the bytes free and where), a folder
not writable, or the cause in short; and what to do."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

FULL_BELOW = 2**20  # bytes: a write that failed with less free than this met a full disk


def free_bytes(folder: Path) -> Optional[int]:
    """Bytes free for this user in ``folder``'s file system (None where it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def mount_point(folder: Path) -> Path:
    """The mount point of the file system holding ``folder``."""
    folder = folder.resolve()
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def write_failure(path: Path, exc: BaseException, left: Optional[int] = None) -> str:
    """A one-line message for a failed write of ``path``: the cause in short, and what to do.
    ``left``: the bytes that were free when the write failed (GDAL's errors on a full disk
    name SQLite statements or broken JSON, not the disk)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    code = getattr(exc, "errno", None)
    lowered = text.lower()
    free = free_bytes(path.parent)
    full = free == 0 or (left is not None and left < FULL_BELOW)
    if full or code == errno.ENOSPC or "disk is full" in lowered or "no space left" in lowered:
        where = f"{free:,} bytes free on {mount_point(path.parent)}" if free is not None else ""
        return (f"could not write {path}: the disk is full ({where}, less than the file "
                "needs). Free some space or choose another folder; nothing was changed there.")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"could not write {path}: the folder {path.parent} is not writable "
                f"({os.strerror(code)}). Choose a folder you can write to.")
    if len(text) > 200:
        text = text[:200] + "..."
    return f"could not write {path}: {text}. Nothing was changed there."
