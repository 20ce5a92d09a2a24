"""Advisory locks between processes: one holder of a lock file at a time, its pid written in it.

Used for one writer per model folder (core/weights/locks.py) and one run per output file
(core/outputs.py). ``flock`` locks are released by the system when their process dies, so a
killed holder never leaves a lock behind; the lock file itself goes when its holder is done.
Where the system has no ``fcntl`` (Windows) nothing is locked.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]


class LockHeld(Exception):
    """Another process (or another lock in this one) holds the lock; ``pid`` when known."""

    def __init__(self, path: Path, pid: Optional[int]) -> None:
        super().__init__(f"{path} is held by {f'process {pid}' if pid else 'another process'}")
        self.path, self.pid = path, pid


def _holder(fd: int) -> Optional[int]:
    """The pid the holder wrote into the lock file (None before it has written one)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class FileLock:
    """``path`` held exclusively between :meth:`acquire` and :meth:`release` (or as a
    ``with`` block). ``acquire`` never waits: LockHeld at once when someone else holds it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> "FileLock":
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _holder(fd)
                os.close(fd)
                raise LockHeld(self.path, pid) from None
            try:  # its last holder may have removed the file between our open and flock
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still held: nobody else can be using it
        finally:
            os.close(fd)

    def __enter__(self) -> "FileLock":
        return self if self._fd is not None else self.acquire()  # held already: keep it

    def __exit__(self, kind: Optional[type], exc: Optional[BaseException],
                 trace: Optional[TracebackType]) -> None:
        self.release()
