"""Write a state dict as ``torch.save`` does (zip format), with numpy alone.

The file has the members PyTorch 2 writes: ``<archive>/data.pkl`` (protocol 2: an OrderedDict
of ``torch._utils._rebuild_tensor_v2`` calls on persistent storage ids, the way torch pickles
it), ``.format_version``, ``.storage_alignment``, ``byteorder``, one uncompressed
``data/<key>`` per tensor with its bytes aligned to 64 in the file, and ``version``. Each tensor
is written C-contiguous with a storage of its own. ``torch.load`` (``weights_only=True``,
``mmap=True`` too) reads it back; torch_zip.py reads it without torch. Zip64 records are
written where sizes or offsets need them (``force_zip64`` always writes them, for tests).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Mapping, Union

import numpy as np

from .tensor_data import STORAGE_DTYPES, TensorData
from .torch_pickle import STORAGE_CLASSES

ALIGNMENT = 64
_STORAGE_CLASS = {dtype: name for name, dtype in STORAGE_CLASSES.items()}
_NUMPY_NAMES = {np.dtype(v).name: k for k, v in STORAGE_DTYPES.items() if k != "bfloat16"}
_LIMIT = 0xFFFFFFFF
_CHUNK = 64 << 20


# ------------------------------------------------------------------ pickle opcodes (protocol 2)
def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2 ** 31) <= value < 2 ** 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"


def state_pickle(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The ``data.pkl`` of (name, dtype, shape) tensors, storage i for the i-th."""
    out = [b"\x80\x02", _ORDERED_DICT, b"("]
    for key, (name, dtype, shape) in enumerate(entries):
        count = int(np.prod(shape, dtype=np.int64))
        strides = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        storage = (b"(" + _str("storage") + _global("torch", _STORAGE_CLASS[dtype]) + _str(str(key))
                   + _str("cpu") + _int(count) + b"tQ")
        out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), b"(", storage, _int(0),
                _tuple(shape), _tuple(strides), b"\x89", _ORDERED_DICT, b"tR"]
    out.append(b"u.")
    return b"".join(out)


# ------------------------------------------------------------------ zip container
class _ZipWriter:
    """Stored (uncompressed) members, each member's data at a multiple of ALIGNMENT."""

    def __init__(self, path: Path, force_zip64: bool) -> None:
        self.handle = open(path, "wb")
        self.force = force_zip64
        self.central: list[bytes] = []

    def add(self, name: str, chunks: list[memoryview], size: int) -> None:
        raw_name = name.encode("utf-8")
        offset = self.handle.tell()
        big = self.force or size >= _LIMIT
        zip64 = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        pad = -(offset + 30 + len(raw_name) + len(zip64)) % ALIGNMENT
        if 0 < pad < 4:
            pad += ALIGNMENT
        extra = zip64 + (struct.pack("<HH", 0x4246, pad - 4) + b"Z" * (pad - 4) if pad else b"")
        shown = _LIMIT if big else size
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, 0, 0, 0, 0, 0,
                             shown, shown, len(raw_name), len(extra))
        self.handle.write(header + raw_name + extra)
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            self.handle.write(chunk)
        end = self.handle.tell()
        self.handle.seek(offset + 14)
        self.handle.write(struct.pack("<I", crc))
        self.handle.seek(end)
        fields = [size, size] if big else []
        if self.force or offset >= _LIMIT:
            fields.append(offset)
        extra64 = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        self.central.append(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 45 if fields else 20, 45 if fields else 20, 0, 0, 0, 0,
            crc, shown, shown, len(raw_name), len(extra64), 0, 0, 0, 0,
            _LIMIT if (self.force or offset >= _LIMIT) else offset) + raw_name + extra64)

    def close(self) -> None:
        start = self.handle.tell()
        for entry in self.central:
            self.handle.write(entry)
        end = self.handle.tell()
        count, length = len(self.central), end - start
        if self.force or count >= 0xFFFF or start >= _LIMIT or length >= _LIMIT:
            self.handle.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count,
                                          length, start))
            self.handle.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
            count, length, start = 0xFFFF, _LIMIT, _LIMIT
        self.handle.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, length, start, 0))
        self.handle.close()


def _chunks(array: np.ndarray) -> list[memoryview]:
    flat = array.reshape(-1).view(np.uint8)
    return [memoryview(flat[i:i + _CHUNK]) for i in range(0, flat.size, _CHUNK)]


def save_state_dict(state: Mapping[str, Union[TensorData, np.ndarray]], path: Path,
                    force_zip64: bool = False) -> Path:
    """Write ``state`` (name -> TensorData, or a numpy array of a dtype torch has) to ``path``
    as ``torch.save(OrderedDict(state), path)`` would; returns ``path``."""
    path = Path(path)
    tensors = []
    for name, value in state.items():
        if not isinstance(value, TensorData):
            value = np.asarray(value)
            if value.dtype.name not in _NUMPY_NAMES:
                raise ValueError(f"{name}: numpy dtype {value.dtype} has no torch storage")
            value = TensorData(value, _NUMPY_NAMES[value.dtype.name])
        tensors.append((name, value))
    archive = path.name.rsplit(".", 1)[0] or "archive"
    writer = _ZipWriter(path, force_zip64)
    try:
        data = state_pickle([(name, t.dtype, t.shape) for name, t in tensors])
        writer.add(f"{archive}/data.pkl", [memoryview(data)], len(data))
        for name, text in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")):
            writer.add(f"{archive}/{name}", [memoryview(text)], len(text))
        for key, (_, tensor) in enumerate(tensors):
            array = np.ascontiguousarray(tensor.array, dtype=STORAGE_DTYPES[tensor.dtype])
            writer.add(f"{archive}/data/{key}", _chunks(array), array.nbytes)
        writer.add(f"{archive}/version", [memoryview(b"3\n")], 2)
        writer.close()
    except BaseException:
        writer.handle.close()
        path.unlink(missing_ok=True)  # never a half-written checkpoint
        raise
    return path
