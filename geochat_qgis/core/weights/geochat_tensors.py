"""The tensors of a converted GeoChat, named as a standard LLaVA-1.5 checkpoint, streamed.

``plan_tensors`` lists every output tensor (name, shape, dtype, source) from metadata alone, so
writers can lay out their files before reading any data. ``stream_tensors`` then yields them
shard by shard, as TensorData (numpy, no torch): one source shard is open at a time and each
tensor is released once written.
Names follow the llava-hf layout (``language_model.model.*``, ``language_model.lm_head.weight``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``), which transformers 4 and 5 and
vLLM all load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import ModelError
from .checkpoint_io import open_tensors
from .geochat_checkpoint import GEOCHAT_IMAGE_SIZE, GeoChatCheckpoint
from .tensor_data import FLOATS, STORAGE_DTYPES, TensorData

TEXT_PREFIX = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
VISION_PREFIX = "vision_tower.vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."
POSITION_TABLE = f"{VISION_PREFIX}embeddings.position_embedding.weight"
_GROWN = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its LLaVA name, shape, dtype and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: Path
    source_name: str


def _cubic_weights(size_from: int, size_to: int) -> tuple[np.ndarray, np.ndarray]:
    """(source rows (size_to, 4), weights (size_to, 4)) of bicubic resampling with
    ``align_corners=True`` (a = -0.75, edge rows repeated), as torch's interpolate defines it."""
    a = -0.75
    real = np.arange(size_to) * ((size_from - 1) / (size_to - 1)) if size_to > 1 else np.zeros(1)
    first = np.floor(real)
    t = real - first
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731 (|x| <= 1)
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731 (1 < |x| < 2)
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    rows = np.clip(first.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, size_from - 1)
    return rows, weights


def interpolate_position_table(table: np.ndarray, grid_to: int) -> np.ndarray:
    """GeoChat's load-time interpolation (clip_encoder.py): the CLS row kept, the square grid
    resized with bicubic, ``align_corners=True``, returned as float32.

    Computed in float64 and rounded once, so it is the same on every machine (torch's float32
    kernels differ from it, and between CPU builds, in the last bit or so).
    """
    rows, dim = table.shape
    grid_from = math.isqrt(rows - 1)
    if grid_from * grid_from != rows - 1:
        raise ModelError(f"CLIP position table has {rows} rows, not a square grid plus CLS.")
    table = np.asarray(table, dtype=np.float32)
    if grid_from == grid_to:
        return table.copy()
    index, weights = _cubic_weights(grid_from, grid_to)
    resample = np.zeros((grid_to, grid_from))
    np.add.at(resample, (np.repeat(np.arange(grid_to), 4), index.reshape(-1)), weights.reshape(-1))
    grid = table[1:].astype(np.float64).reshape(grid_from, grid_from, dim)
    grid = np.einsum("yi,xj,ijd->yxd", resample, resample, grid, optimize=True)
    return np.concatenate([table[:1], grid.reshape(grid_to * grid_to, dim).astype(np.float32)])


def grow_rows(matrix: TensorData, rows: int) -> TensorData:
    """``matrix`` with rows appended up to ``rows`` (>= its own), each the mean of its rows
    (computed in float32, then rounded to the matrix's type)."""
    extra = rows - matrix.shape[0]
    if extra == 0:
        return matrix
    mean = TensorData(matrix.float32().mean(axis=0, keepdims=True, dtype=np.float32), "float32")
    mean = mean.to(matrix.dtype) if matrix.dtype != "float32" else mean
    grown = np.concatenate([np.asarray(matrix.array, dtype=STORAGE_DTYPES[matrix.dtype]),
                            np.repeat(mean.array, extra, axis=0)])
    return TensorData(grown, matrix.dtype)


def _rename_geochat(key: str) -> Optional[str]:
    if key == "lm_head.weight":
        return LM_HEAD
    if key.startswith("model.mm_projector."):
        index, kind = key[len("model.mm_projector."):].split(".")
        return f"{PROJECTOR_PREFIX}linear_{1 if index == '0' else 2}.{kind}"
    if key.startswith("model.vision_tower.") or key.endswith("rotary_emb.inv_freq"):
        return None  # GeoChat's loader discards the saved tower and recomputes rotary caches
    return TEXT_PREFIX + key[len("model."):]


def plan_tensors(ckpt: GeoChatCheckpoint, vocab_size: int, dtype: Optional[str] = None) -> list[PlannedTensor]:
    """Every output tensor, grouped by source shard (CLIP first), in a stable order."""
    dtype = dtype or ckpt.dtype
    if vocab_size < ckpt.checkpoint_vocab:
        raise ModelError(f"{ckpt.path} has {ckpt.checkpoint_vocab} vocabulary rows but its tokenizer "
                         f"only {vocab_size} tokens: the tokenizer files do not belong to it.")
    clip = ckpt.clip
    plan: list[PlannedTensor] = []
    side = GEOCHAT_IMAGE_SIZE // int(clip.vision["patch_size"])
    for key in sorted(clip.expected_keys(), key=lambda k: (str(clip.metas[k].shard), k)):
        shape = clip.metas[key].shape
        if key.endswith("position_embedding.weight"):
            shape = (side * side + 1, shape[1])
        plan.append(PlannedTensor(VISION_PREFIX + key[len(clip.prefix):], shape, dtype, clip.metas[key].shard, key))
    for key in sorted(ckpt.expected_keys(), key=lambda k: (str(ckpt.metas[k].shard), k)):
        name = _rename_geochat(key)
        shape = ckpt.metas[key].shape
        if key in _GROWN:
            shape = (vocab_size, shape[1])
        plan.append(PlannedTensor(name, shape, dtype, ckpt.metas[key].shard, key))
    return plan


def _convert(item: PlannedTensor, tensor: TensorData) -> TensorData:
    if tensor.dtype not in FLOATS:
        raise ModelError(f"{item.source}: tensor {item.source_name} holds {tensor.dtype} values, not "
                         "floating-point weights; the checkpoint is corrupt.")
    if item.name == POSITION_TABLE:
        tensor = TensorData(interpolate_position_table(tensor.float32(), math.isqrt(item.shape[0] - 1)),
                            "float32")
    elif item.source_name in _GROWN:
        tensor = grow_rows(tensor, item.shape[0])
    if tensor.shape != item.shape:
        raise ModelError(f"{item.source}: tensor {item.source_name} has shape {list(tensor.shape)}, "
                         f"expected {list(item.shape)}; the shard is corrupt.")
    return tensor.to(item.dtype)


def stream_tensors(plan: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, TensorData]]:
    """Yield (planned tensor, data) in plan order, opening one source shard at a time; the data
    is C-contiguous in the planned dtype."""
    index = 0
    while index < len(plan):
        shard = plan[index].source
        with open_tensors(shard) as tensors:
            while index < len(plan) and plan[index].source == shard:
                item = plan[index]
                yield item, _convert(item, tensors[item.source_name])
                index += 1
