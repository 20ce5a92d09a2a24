"""Write a model folder all at once: build it beside the target, then rename it into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ModelError


def check_output_dir(out: Path) -> None:
    """Refuse an output folder that already holds files (never overwrite a model silently)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} already exists and is not empty; choose a new output folder or remove it.")


@contextmanager
def staged_output_dir(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out`` that becomes ``out`` when the block succeeds.

    On any error the temporary folder is removed and ``out`` is left untouched.
    """
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
