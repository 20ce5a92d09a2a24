"""One writer per model folder: an advisory lock file beside it (another QGIS, the CLI)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ModelError
from ..file_lock import FileLock, LockHeld


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold ``.<folder name>.lock`` beside ``folder`` while the block runs; ModelError at once
    when another process (or thread) holds it. The lock file goes when its holder is done."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder.parent / f".{folder.name}.lock")
    try:
        lock.acquire()
    except LockHeld:
        raise ModelError(f"{folder.name} is being got (or downloaded) by another "
                         "process (QGIS or the command line); wait for it to finish.") from None
    try:
        yield
    finally:
        lock.release()
