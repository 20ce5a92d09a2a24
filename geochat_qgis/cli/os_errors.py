"""A failed file operation in words, for the commands that read and write files."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Optional


def os_error_message(exc: OSError, folder: Optional[str | os.PathLike] = None) -> str:
    """A failed file operation in words: which file, what happened, what to do. ``folder``:
    where the command was writing (its free space explains errors that carry no errno, like
    numpy's "4096 requested and 1328 written")."""
    where = f" {exc.filename}" if exc.filename else (f" {folder}" if folder else "")
    code = exc.errno or 0
    if code in (0, errno.ENOSPC, errno.EIO) and folder is not None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 2**20:
                code = errno.ENOSPC
    advice = {
        errno.ENOSPC: "the disk is full: free some space or choose another folder",
        errno.EROFS: "the file system is read-only: choose a folder you can write to",
        errno.EACCES: "permission denied: choose a folder you can write to",
        errno.EPERM: "not permitted: choose a folder you can write to",
        errno.ENOENT: "not found: check the path",
        errno.ENOTDIR: "a part of the path is not a folder: check the path",
        errno.EISDIR: "it is a folder: give a file name",
    }.get(code, f"{exc.strerror or exc}: check the path and the disk")
    return f"cannot use{where}: {advice}"
