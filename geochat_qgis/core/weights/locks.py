"""One writer per model folder: an advisory lock file beside it (another QGIS, the CLI)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ModelError


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold ``.<folder name>.lock`` beside ``folder`` while the block runs; ModelError at once
    when another process (or thread) holds it. The lock file goes when its holder is done."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            import fcntl
        except ImportError:
            fcntl = None  # no advisory locks (Windows): one QGIS at a time
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ModelError(f"{folder.name} is being got (or downloaded) by another "
                                 "process (QGIS or the command line); wait for it to finish."
                                 ) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # still held: nobody else can be using it
