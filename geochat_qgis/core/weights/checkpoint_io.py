"""Read weight shards safely, one shard at a time, with numpy alone (torch optional).

A shard is a ``.safetensors`` file or a PyTorch ``.bin`` pickle. :func:`open_tensors` gives its
tensors as :class:`TensorData` over a read-only memory map of the file, so only the tensors
being converted are read, never the whole checkpoint. Pickles go through a restricted unpickler
(torch_zip.py, torch_pickle.py) that accepts only what ``torch.save`` writes for a plain state
dict; a pickle that would run code is refused, never executed. ``GEOCHAT_PICKLE_READER=torch``
reads pickles with ``torch.load(weights_only=True, mmap=True)`` instead (the same tensors; for
comparisons). :func:`open_shard` gives torch tensors, for code that runs torch anyway.
"""
from __future__ import annotations

import gc
import json
import os
import pickle
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import numpy as np

from ..errors import ModelError
from .shard_index import index_shards
from .tensor_data import STORAGE_DTYPES, TensorData
from .torch_zip import read_torch_checkpoint

if TYPE_CHECKING:
    import torch

READER_ENV = "GEOCHAT_PICKLE_READER"  # numpy (default) or torch
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorMeta:
    """Where a tensor lives and what it looks like, known without reading its data."""

    shard: Path
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a Hugging Face style folder, safetensors preferred.

    An index file (``*.index.json``) names the shards when present; every shard it names must
    be a safe path inside ``folder`` and exist (shard_index.py). Raises ModelError when the
    folder holds no weights.
    """
    for suffix, single in ((".safetensors", "model.safetensors"), (".bin", "pytorch_model.bin")):
        index = folder / f"{single.rsplit('.', 1)[0]}{suffix}.index.json"
        if index.is_file():
            return index_shards(folder, index)
        shards = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        if shards:
            return shards
    raise ModelError(
        f"No weights in {folder}: expected *.safetensors or pytorch_model*.bin files; "
        "point to the folder that holds the checkpoint."
    )


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file holds all its data."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelError(f"{path} is truncated (no safetensors header); download it again.")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ModelError(f"{path} is truncated (header cut short); download it again.")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ModelError(f"{path} is not a safetensors file ({exc}); download it again.") from exc
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end != size:
        raise ModelError(
            f"{path} is truncated or corrupt: its header describes {8 + length + end} bytes, "
            f"the file has {size}; download it again."
        )
    return header


@contextmanager
def _refusing_unsafe_pickles(path: Path) -> Iterator[None]:
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"Refusing to load {path}: it contains Python objects that would run code when "
            f"unpickled ({str(exc).splitlines()[-1] if str(exc) else exc}). Use a checkpoint from "
            "a trusted source, ideally in safetensors format."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is truncated or corrupt ({exc}); download it again.") from exc


def _flat_tensors(path: Path, state: object, kind: type) -> dict:
    if not isinstance(state, Mapping) or not all(isinstance(v, kind) for v in state.values()):
        raise ModelError(f"{path} does not hold a flat dict of tensors; it is not a model shard.")
    return dict(state)


def _load_pickle(path: Path) -> dict[str, "torch.Tensor"]:
    """A ``.bin`` shard as a dict of torch tensors; memory-mapped when it is a zip pickle."""
    import torch

    mmap = zipfile.is_zipfile(path)
    with path.open("rb") as handle:
        magic = handle.read(2)
    if not mmap and magic == b"PK":
        raise ModelError(f"{path} is truncated (its zip directory is missing); download it again.")
    with _refusing_unsafe_pickles(path):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    return _flat_tensors(path, state, torch.Tensor)


def _from_torch(tensor: "torch.Tensor") -> TensorData:
    import torch

    dtype = str(tensor.dtype).replace("torch.", "")
    if dtype not in STORAGE_DTYPES:
        raise ModelError(f"A tensor of type {dtype} cannot be converted; only {', '.join(STORAGE_DTYPES)}.")
    if tensor.dtype == torch.bfloat16:
        return TensorData(tensor.view(torch.int16).numpy().view(np.uint16), dtype)
    return TensorData(tensor.numpy(), dtype)


def pickle_reader() -> str:
    """Which reader opens ``.bin`` pickles: ``numpy`` (default) or ``torch`` (READER_ENV)."""
    reader = os.environ.get(READER_ENV, "").strip().lower() or "numpy"
    if reader not in ("numpy", "torch"):
        raise ModelError(f"{READER_ENV}={reader!r}: use numpy or torch.")
    return reader


def _read_pickle(path: Path) -> dict[str, TensorData]:
    """A ``.bin`` shard as a dict of TensorData over a memory map of the file."""
    if pickle_reader() == "torch":
        return {name: _from_torch(t) for name, t in _load_pickle(path).items()}
    with _refusing_unsafe_pickles(path):
        state = read_torch_checkpoint(path)
    return _flat_tensors(path, state, TensorData)


def _read_safetensors(path: Path) -> dict[str, TensorData]:
    """A ``.safetensors`` shard as a dict of TensorData over a memory map of the file."""
    header = _safetensors_header(path)
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    whole = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    tensors = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelError(f"{path}: tensor {name} has type {info['dtype']}, which cannot be converted.")
        begin, end = (8 + length + int(i) for i in info["data_offsets"])
        shape = tuple(int(n) for n in info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * STORAGE_DTYPES[dtype].itemsize:
            raise ModelError(f"{path} is corrupt: tensor {name} does not fill its bytes; download it again.")
        tensors[name] = TensorData(whole[begin:end].view(STORAGE_DTYPES[dtype]).reshape(shape), dtype)
    return tensors


def shard_metadata(path: Path) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes of the tensors in one shard (reads no tensor data)."""
    if path.suffix == ".safetensors":
        header = _safetensors_header(path)
        return {
            name: TensorMeta(path, tuple(info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
            for name, info in header.items()
        }
    with open_tensors(path) as tensors:
        return {name: TensorMeta(path, t.shape, t.dtype) for name, t in tensors.items()}


def checkpoint_metadata(files: list[Path]) -> dict[str, TensorMeta]:
    """Metadata of every tensor across shards; a name found in two shards is an error."""
    metas: dict[str, TensorMeta] = {}
    for path in files:
        for name, meta in shard_metadata(path).items():
            if name in metas:
                raise ModelError(
                    f"Tensor {name} appears in both {metas[name].shard.name} and {path.name}; "
                    "the checkpoint is inconsistent."
                )
            metas[name] = meta
    return metas


@contextmanager
def open_tensors(path: Path) -> Iterator[Mapping[str, TensorData]]:
    """The tensors of one shard as TensorData, read lazily (no torch needed); released
    (unmapped) when the block ends."""
    with _released(_read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)) as state:
        yield state


@contextmanager
def open_shard(path: Path) -> Iterator[Mapping[str, "torch.Tensor"]]:
    """The tensors of one shard as torch tensors (needs torch), read lazily; released
    (unmapped) when the block ends."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _safetensors_header(path)
        with safe_open(str(path), framework="pt") as handle:
            yield _SafetensorsView(handle)
        return
    with _released(_load_pickle(path)) as state:
        yield state


@contextmanager
def _released(state: dict) -> Iterator[dict]:
    """``state`` for the block; its tensors dropped (their memory maps closed) afterwards."""
    try:
        yield state
    finally:
        state.clear()
        gc.collect()


class _SafetensorsView(Mapping):
    """A read-only mapping over an open safetensors file; each access reads one tensor."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, name: str) -> "torch.Tensor":
        if name not in self._keys:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
