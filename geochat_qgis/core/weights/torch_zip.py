"""Read a PyTorch ``.bin`` checkpoint with numpy alone: every storage a memory map of the file.

Two containers are read. The zip format (``torch.save`` since PyTorch 1.6) keeps the pickle in
``<archive>/data.pkl`` and each storage, uncompressed, in ``<archive>/data/<key>``; a storage is
a view of one memory map of the whole file at its member's data offset. The legacy format
(``_use_new_zipfile_serialization=False``, PyTorch < 1.6) is a run of pickles followed by each
storage's element count and bytes, in the order the storage-key pickle lists them.

The pickle goes through :mod:`torch_pickle`'s restricted unpickler: a checkpoint that would run
code is refused (RefusedPickle), one cut short or malformed is a ValueError. Nothing is read
from the storages until a tensor's values are used.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .torch_pickle import Storage, resolve, storage_dtype, unpickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py's MAGIC_NUMBER
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIGNATURE = 0x04034B50


def read_torch_checkpoint(path: Path) -> Any:
    """The object ``torch.save`` wrote to ``path``, each tensor a TensorData over a read-only
    memory map (bfloat16 as uint16 bits). RefusedPickle / ValueError as above."""
    path = Path(path)
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic[:2] == b"PK":
        return _read_zip(path)
    if magic[:2] == b"\x80\x02":
        return _read_legacy(path)
    raise ValueError("it is neither a zip nor a legacy PyTorch pickle")


def _data_offset(handle, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"the zip entry {info.filename} has no local header")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _read_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"its zip directory is missing or damaged ({exc})") from exc
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError("it is a zip file but not a PyTorch checkpoint (no single <archive>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        members = {info.filename: info for info in archive.infolist()}
        big_endian = False
        if f"{prefix}byteorder" in members:
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise ValueError(f"its byteorder record says {order!r}")
            big_endian = order == "big"
        try:
            with archive.open(pickles[0]) as handle:
                state, storages = unpickle(handle)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"its pickle is damaged ({exc})") from exc
        size = path.stat().st_size
        whole = np.memmap(path, dtype=np.uint8, mode="r") if storages else None
        with path.open("rb") as raw:
            for storage in storages.values():
                if storage.view_of is None:
                    info = members.get(f"{prefix}data/{storage.key}")
                    if info is None:
                        raise ValueError(f"storage {storage.key} is missing from the zip")
                    _attach(storage, info, _data_offset(raw, info), size, whole, big_endian)
    return resolve(state)


def _attach(storage: Storage, info: zipfile.ZipInfo, offset: int, size: int,
            whole: np.memmap, big_endian: bool) -> None:
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"storage {storage.key} is compressed; torch.save stores them uncompressed")
    dtype = storage_dtype(storage, big_endian)
    if info.file_size != storage.numel * dtype.itemsize:
        raise ValueError(f"storage {storage.key} holds {info.file_size} bytes, its record says "
                         f"{storage.numel} x {dtype.itemsize}")
    if offset + info.file_size > size:
        raise ValueError(f"storage {storage.key} runs past the end of the file")
    storage.array = whole[offset:offset + info.file_size].view(dtype)


def _read_legacy(path: Path) -> Any:
    with path.open("rb") as handle:
        magic, _ = unpickle(handle)
        if magic != LEGACY_MAGIC:
            raise ValueError("it starts with a pickle but is not a PyTorch checkpoint")
        version, _ = unpickle(handle)
        if version != 1001:
            raise ValueError(f"its legacy format version is {version!r}, not 1001")
        info, _ = unpickle(handle)
        big_endian = isinstance(info, dict) and info.get("little_endian") is False
        state, storages = unpickle(handle)
        keys, _ = unpickle(handle)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ValueError("its storage key list is malformed")
        offset = handle.tell()
    size = path.stat().st_size
    whole = np.memmap(path, dtype=np.uint8, mode="r") if keys else None
    for key in keys:
        storage = storages.get(key)
        if storage is None or storage.view_of is not None:
            raise ValueError(f"its storage list names {key!r}, which no tensor uses")
        if offset + 8 > size:
            raise ValueError(f"storage {key} runs past the end of the file")
        (count,) = struct.unpack("<q", bytes(whole[offset:offset + 8]))
        dtype = storage_dtype(storage, big_endian)
        nbytes = storage.numel * dtype.itemsize
        if count != storage.numel or offset + 8 + nbytes > size:
            raise ValueError(f"storage {key} is cut short or does not match its record")
        storage.array = whole[offset + 8:offset + 8 + nbytes].view(dtype)
        offset += 8 + nbytes
    return resolve(state)
