"""A GGUF file opened for reading its header and tensor table, checked first: missing, not GGUF,
damaged or truncated files raise ModelError. Below the backends (core/backends/gguf_files.py) and
the vision code (core/vision/mmproj.py), which both read GGUF files through it."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | os.PathLike[str]):
    """A ``gguf.GGUFReader`` of ``path``; raises ModelError for a missing, non-GGUF, damaged or
    truncated file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Model file not found: {path}. Check the path or download the model.")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{path.name} is not a GGUF file (it starts with {magic!r}). The llama.cpp backend "
            "needs a GGUF text model and its mmproj; use --backend transformers for a Hugging "
            "Face checkpoint folder."
        )
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        data_end = max(
            (tensor.data_offset + int(tensor.n_bytes) for tensor in reader.tensors), default=0
        )
    except Exception as exc:  # the gguf package raises many kinds on a damaged header
        raise ModelError(
            f"{path.name} is a damaged or truncated GGUF file ({exc}). Download or convert it "
            "again."
        ) from exc
    size = path.stat().st_size
    if data_end > size:
        raise ModelError(
            f"{path.name} is truncated: its tensors need {data_end} bytes but the file has "
            f"{size}. The download or conversion did not finish: download or convert it again."
        )
    return reader
