"""Read weight shards safely, one shard at a time.

A shard is a ``.safetensors`` file or a PyTorch ``.bin`` pickle. Pickles are opened only through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, so a
pickle that would run code is rejected instead of executed. Zip pickles are memory-mapped: only
the tensors being converted are read, never the whole checkpoint.
"""
from __future__ import annotations

import gc
import json
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

from ..errors import ModelError

if TYPE_CHECKING:
    import torch

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
    exist. Raises ModelError when the folder holds no weights.
    """
    for suffix, single in ((".safetensors", "model.safetensors"), (".bin", "pytorch_model.bin")):
        index = folder / f"{single.rsplit('.', 1)[0]}{suffix}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelError(f"{index} is not a valid shard index ({exc}); download it again.") from exc
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ModelError(
                    f"{folder} is incomplete: shard(s) {', '.join(missing)} named in {index.name} "
                    "are missing; download them again."
                )
            return [folder / name for name in names]
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
    import pickle

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


def _load_pickle(path: Path) -> dict[str, "torch.Tensor"]:
    """A ``.bin`` shard as a dict of tensors; memory-mapped when it is a zip pickle."""
    import torch

    mmap = zipfile.is_zipfile(path)
    with path.open("rb") as handle:
        magic = handle.read(2)
    if not mmap and magic == b"PK":
        raise ModelError(f"{path} is truncated (its zip directory is missing); download it again.")
    with _refusing_unsafe_pickles(path):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a flat dict of tensors; it is not a model shard.")
    return dict(state)


def shard_metadata(path: Path) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes of the tensors in one shard (reads no tensor data)."""
    if path.suffix == ".safetensors":
        header = _safetensors_header(path)
        return {
            name: TensorMeta(path, tuple(info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
            for name, info in header.items()
        }
    with open_shard(path) as tensors:
        return {
            name: TensorMeta(path, tuple(t.shape), str(t.dtype).replace("torch.", ""))
            for name, t in tensors.items()
        }


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
def open_shard(path: Path) -> Iterator[Mapping[str, "torch.Tensor"]]:
    """The tensors of one shard, read lazily; released (unmapped) when the block ends."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _safetensors_header(path)
        with safe_open(str(path), framework="pt") as handle:
            yield _SafetensorsView(handle)
        return
    state = _load_pickle(path)
    try:
        yield state
    finally:
        state.clear()
        del state
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
