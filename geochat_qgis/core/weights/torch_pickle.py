"""Unpickle what ``torch.save`` writes for a plain state dict, with numpy alone, running no code.

The unpickler honours five kinds of globals and nothing else: ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter`` (without hooks), and
the typed storage classes (``torch.FloatStorage``, ``torch.BFloat16Storage``, ...) named inside
the persistent ids ``('storage', <class>, key, location, numel[, view])`` that stand for each
storage's bytes. Any other global is refused (:class:`RefusedPickle`) before anything could run.

What it gives back is the unpickled object with :class:`PendingTensor` in place of tensors and
the :class:`Storage` records met; the container reader (torch_zip.py) attaches each storage's
bytes (a memory map of the file), then :func:`resolve` turns pending tensors into
:class:`TensorData`, strides and offsets honoured.
"""
from __future__ import annotations

import collections
import math
import pickle
from dataclasses import dataclass, field
from typing import IO, Any, Optional

import numpy as np

from .tensor_data import STORAGE_DTYPES, TensorData

STORAGE_CLASSES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names something other than tensors and plain containers."""


class _NoState:
    """Objects of ours: a pickle's BUILD may not set their attributes."""

    def __setstate__(self, state: Any) -> None:
        raise _refuse(f"setting the state of a {type(self).__name__}")


@dataclass(frozen=True)
class StorageType(_NoState):
    """What ``torch.<X>Storage`` unpickles to here: only its element type."""

    dtype: str


@dataclass(eq=False)
class Storage(_NoState):
    """One storage named by a persistent id; ``array`` (1-D, ``numel`` elements in the storage
    dtype) is attached by the container reader."""

    key: str
    dtype: str
    numel: int
    array: Optional[np.ndarray] = None
    view_of: Optional[tuple["Storage", int]] = None  # legacy format: (root storage, offset)

    def elements(self) -> np.ndarray:
        if self.view_of is not None:
            root, offset = self.view_of
            return root.elements()[offset:offset + self.numel]
        if self.array is None:
            raise ValueError(f"storage {self.key} has no data in the file")
        return self.array


@dataclass(eq=False)
class PendingTensor(_NoState):
    """A tensor rebuild call, checked, waiting for its storage's bytes."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...] = field(default=())

    def resolve(self) -> TensorData:
        elements = self.storage.elements()
        if 0 in self.size:
            return TensorData(np.empty(self.size, dtype=elements.dtype), self.storage.dtype)
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if extent > elements.shape[0]:
            raise ValueError(f"a tensor reaches element {extent} of storage {self.storage.key}, "
                             f"which holds {elements.shape[0]}")
        count = math.prod(self.size)
        if self.stride == _contiguous_strides(self.size):
            array = elements[self.offset:self.offset + count].reshape(self.size)
        else:
            item = elements.dtype.itemsize
            array = np.lib.stride_tricks.as_strided(
                elements[self.offset:], self.size, tuple(s * item for s in self.stride), writeable=False)
        return TensorData(array, self.storage.dtype)


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _refuse(what: str) -> RefusedPickle:
    return RefusedPickle(f"{what}: only tensors and plain containers are allowed")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_hooks(hooks: Any) -> bool:
    return isinstance(hooks, dict) and not hooks


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       hooks: Any, metadata: Any = None) -> PendingTensor:
    if not isinstance(storage, Storage):
        raise _refuse("a tensor rebuilt from something other than a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(map(_whole, (offset, *size, *stride)))):
        raise _refuse("a tensor with a malformed size, stride or offset")
    if not isinstance(requires_grad, bool) or not _no_hooks(hooks) or metadata:
        raise _refuse("a tensor with hooks or Python attributes")
    return PendingTensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> PendingTensor:
    if not isinstance(data, PendingTensor) or not isinstance(requires_grad, bool) or not _no_hooks(hooks):
        raise _refuse("a parameter with hooks or of something other than a tensor")
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """``load()`` gives the object with PendingTensor for tensors; ``storages`` maps each
    storage key met to its Storage."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_CLASSES:
            return StorageType(STORAGE_CLASSES[name])
        raise _refuse(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _refuse(f"persistent id {str(pid)[:80]} is not a storage")
        _, kind, key, location, numel, *view = pid
        if not (isinstance(kind, StorageType) and isinstance(key, str) and isinstance(location, str)
                and _whole(numel)):
            raise _refuse("a malformed storage record")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = Storage(key, kind.dtype, numel)
        elif (storage.dtype, storage.numel) != (kind.dtype, numel):
            raise _refuse(f"storage {key} named twice with different types or sizes")
        if view and view[0] is not None:
            return self._view(storage, view[0])
        return storage

    def _view(self, root: Storage, view: Any) -> Storage:
        """The legacy format's storage views: (view key, offset, size) into a root storage."""
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and _whole(view[1]) and _whole(view[2]) and view[1] + view[2] <= root.numel):
            raise _refuse("a malformed storage view")
        key, offset, size = view
        if key not in self.storages:
            self.storages[key] = Storage(key, root.dtype, size, view_of=(root, offset))
        return self.storages[key]


def unpickle(file: IO[bytes]) -> tuple[Any, dict[str, Storage]]:
    """The object pickled in ``file`` (tensors pending) and the storages it names.

    Raises RefusedPickle for anything but tensors and plain containers, ValueError when the
    pickle is cut short or malformed.
    """
    unpickler = RestrictedUnpickler(file)
    try:
        result = unpickler.load()
    except RefusedPickle:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError,
            ValueError, MemoryError, RecursionError) as exc:
        raise ValueError(f"the pickle is cut short or malformed ({type(exc).__name__}: {exc})") from exc
    return result, unpickler.storages


def storage_dtype(storage: Storage, big_endian: bool = False) -> np.dtype:
    """The numpy dtype a storage's bytes are read with."""
    dtype = STORAGE_DTYPES[storage.dtype]
    return dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype


def resolve(state: Any) -> Any:
    """``state`` with each pending tensor (at its top level) made a TensorData."""
    if isinstance(state, PendingTensor):
        return state.resolve()
    if isinstance(state, dict):
        return {key: resolve(value) if isinstance(value, PendingTensor) else value
                for key, value in state.items()}
    return state
