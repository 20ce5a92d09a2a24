"""A checkpoint tensor held in numpy, whatever its float type, and its exact dtype casts.

numpy has no bfloat16, so a bfloat16 tensor is held as its uint16 bit patterns with the dtype
name beside it. The casts round as torch's do (round to nearest, ties to even; a NaN stays a
quiet NaN), so a conversion gives the same bytes whichever reader produced the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# torch dtype name -> how numpy holds its values (little-endian; bfloat16 as raw bits)
STORAGE_DTYPES = {
    "float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
FLOATS = ("float64", "float32", "float16", "bfloat16")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) widened to float32 (exact)."""
    return (bits.astype("<u4") << 16).view("<f4")


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 bit patterns (uint16), as torch rounds them."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype("<u2")
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")


@dataclass(frozen=True)
class TensorData:
    """One tensor: ``array`` holds its values as stored (any strides, possibly a read-only
    memory map; bfloat16 as uint16 bits), ``dtype`` names its torch dtype."""

    array: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.size) * STORAGE_DTYPES[self.dtype].itemsize

    def float32(self) -> np.ndarray:
        """The values as float32 (a new array; exact for every float type but float64)."""
        if self.dtype == "bfloat16":
            return bf16_to_f32(self.array)
        return self.array.astype("<f4")

    def to(self, dtype: str) -> "TensorData":
        """The tensor in ``dtype``, C-contiguous and little-endian (float types only); itself
        when it already is."""
        if self.dtype not in FLOATS or dtype not in FLOATS:
            raise ValueError(f"cannot cast a {self.dtype} tensor to {dtype}")
        with np.errstate(over="ignore"):  # beyond float16's range is inf, as in torch
            if dtype == self.dtype:
                array = self.array  # no copy when already C-contiguous and little-endian
            elif dtype == "bfloat16":
                array = f32_to_bf16(self.float32())  # float64 goes through float32, as in torch
            elif self.dtype == "bfloat16":
                array = bf16_to_f32(self.array).astype(STORAGE_DTYPES[dtype])
            else:
                array = self.array.astype(STORAGE_DTYPES[dtype], order="C")
        return TensorData(np.ascontiguousarray(array, dtype=STORAGE_DTYPES[dtype]), dtype)

    def raw(self) -> memoryview:
        """Its bytes, C order, little-endian (a copy only where the array is not already so)."""
        array = np.ascontiguousarray(self.array, dtype=STORAGE_DTYPES[self.dtype])
        return memoryview(array.reshape(-1).view(np.uint8))
