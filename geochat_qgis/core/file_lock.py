"""Advisory locks between processes: one holder of a lock file at a time, its pid written in it.

Used for one writer per model folder (core/weights/locks.py) and one run per output file
(core/outputs.py). ``flock`` locks are released by the system when their process dies, so a
killed holder never leaves a lock behind; the lock file itself goes when its holder is done.
On Windows the same holds with ``msvcrt.locking`` on one byte far past the pid (Windows byte
locks are mandatory, so the pid itself stays readable); the system drops it with its process.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # not Windows
    msvcrt = None  # type: ignore[assignment]

_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte msvcrt locks: past the pid, which others must read


class LockHeld(Exception):
    """Another process (or another lock in this one) holds the lock; ``pid`` when known."""

    def __init__(self, path: Path, pid: Optional[int]) -> None:
        super().__init__(f"{path} is held by {f'process {pid}' if pid else 'another process'}")
        self.path, self.pid = path, pid


def _holder(fd: int) -> Optional[int]:
    """The pid the holder wrote into the lock file (None before it has written one)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock(fd: int) -> None:
    """Take the lock on ``fd`` without waiting; OSError when another holds it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _unlock(fd: int) -> None:
    """Release the Windows byte lock (closing the file releases an flock by itself)."""
    try:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass  # closing the file releases it too


class FileLock:
    """``path`` held exclusively between :meth:`acquire` and :meth:`release` (or as a
    ``with`` block). ``acquire`` never waits: LockHeld at once when someone else holds it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> "FileLock":
        if fcntl is None and msvcrt is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
            try:
                _lock(fd)
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
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if msvcrt is not None:  # Windows removes no file that is open: unlock, close, remove
            _unlock(fd)
            os.close(fd)
            try:
                self.path.unlink(missing_ok=True)
            except PermissionError:
                pass  # another process has just opened it to take the lock: it keeps the file
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
