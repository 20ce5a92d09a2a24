"""Write a safetensors file tensor by tensor, without holding the model in memory.

The header (names, dtypes, shapes, offsets) is written first from planned shapes; each tensor's
bytes follow as it arrives, in the planned order.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .tensor_data import TensorData

if TYPE_CHECKING:
    import torch

_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2), "float64": ("F64", 8)}


class SafetensorsStreamWriter:
    """``write`` each planned tensor in order, then ``close``; the file is complete only then."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...], str]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, shape, dtype in entries:
            code, width = _DTYPES[dtype]
            nbytes = math.prod(shape) * width
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._handle = open(path, "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: "TensorData | torch.Tensor") -> None:
        """The next planned tensor: a TensorData (numpy), or a torch tensor."""
        expected_name, nbytes = self._expected[self._next]
        if isinstance(tensor, TensorData):
            data = tensor.raw()
        else:
            import torch

            data = tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy()
        if name != expected_name or data.nbytes != nbytes:
            raise ValueError(f"safetensors writer expected {expected_name} ({nbytes} bytes), got {name}")
        self._handle.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            self._handle.close()
            raise ValueError(f"safetensors file closed after {self._next} of {len(self._expected)} tensors")
        self._handle.close()

    def abort(self) -> None:
        """Close the file unfinished (after an error or a cancel); the caller removes it."""
        self._handle.close()
