"""The tensors of a converted GeoChat, named as a standard LLaVA-1.5 checkpoint, streamed.

``plan_tensors`` lists every output tensor (name, shape, dtype, source) from metadata alone, so
writers can lay out their files before reading any data. ``stream_tensors`` then yields them
shard by shard: one source shard is open at a time and each tensor is released once written.
Names follow the llava-hf layout (``language_model.model.*``, ``language_model.lm_head.weight``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``), which transformers 4 and 5 and
vLLM all load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from ..errors import ModelError
from .checkpoint_io import open_shard
from .geochat_checkpoint import GEOCHAT_IMAGE_SIZE, GeoChatCheckpoint

if TYPE_CHECKING:
    import torch

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


def interpolate_position_table(table: "torch.Tensor", grid_to: int) -> "torch.Tensor":
    """GeoChat's load-time interpolation (clip_encoder.py): CLS row kept, the square grid resized
    with bicubic, ``align_corners=True``, computed in float32."""
    import torch
    import torch.nn.functional as F

    rows, dim = table.shape
    grid_from = math.isqrt(rows - 1)
    if grid_from * grid_from != rows - 1:
        raise ModelError(f"CLIP position table has {rows} rows, not a square grid plus CLS.")
    table = table.float()
    if grid_from == grid_to:
        return table
    grid = table[1:].T.reshape(1, dim, grid_from, grid_from)
    grid = F.interpolate(grid, size=grid_to, mode="bicubic", align_corners=True)
    return torch.cat([table[:1], grid.reshape(dim, grid_to * grid_to).T], dim=0)


def grow_rows(matrix: "torch.Tensor", rows: int) -> "torch.Tensor":
    """``matrix`` with rows appended up to ``rows`` (>= its own), each the mean of its rows."""
    import torch

    extra = rows - matrix.shape[0]
    if extra == 0:
        return matrix
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(extra, -1)], dim=0)


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


def _convert(item: PlannedTensor, tensor: "torch.Tensor") -> "torch.Tensor":
    import torch

    if item.name == POSITION_TABLE:
        tensor = interpolate_position_table(tensor, math.isqrt(item.shape[0] - 1))
    elif item.source_name in _GROWN:
        tensor = grow_rows(tensor, item.shape[0])
    tensor = tensor.to(getattr(torch, item.dtype)).contiguous()
    if tuple(tensor.shape) != item.shape:
        raise ModelError(f"{item.source}: tensor {item.source_name} has shape {list(tensor.shape)}, "
                         f"expected {list(item.shape)}; the shard is corrupt.")
    return tensor


def stream_tensors(plan: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, "torch.Tensor"]]:
    """Yield (planned tensor, data) in plan order, opening one source shard at a time."""
    index = 0
    while index < len(plan):
        shard = plan[index].source
        with open_shard(shard) as tensors:
            while index < len(plan) and plan[index].source == shard:
                item = plan[index]
                yield item, _convert(item, tensors[item.source_name])
                index += 1
