"""Qwen2.5-VL's image features in numpy, float32 throughout: the exact reference.

The pixels Qwen's image processor gives (rescale, CLIP normalisation, the still image repeated
over ``temporal`` frames, patches in 2x2 merge-block order), the Conv3d patch embedding, 2-D
rotary position embeddings (height on the first quarter of each head, width on the second),
window attention in 112-px windows except in the full-attention blocks, RMSNorm, the SiLU-gated
MLP, and the merger (RMSNorm, 2x2 spatial merge, Linear-GELU-Linear with the exact GELU).
Checked against transformers' own Qwen2.5-VL vision model in tests/unit/test_qwen_reference.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .clip_numpy import gelu

Linear = tuple[np.ndarray, np.ndarray]  # (in, out) weight for ``x @ w``, (out,) bias
_ALL_HEADS_UP_TO = 256  # attention segments up to this many patches: all heads in one product


@dataclass
class QwenBlock:
    norm1: np.ndarray
    qkv: Linear  # q, k, v side by side
    proj: Linear
    norm2: np.ndarray
    gate: Linear
    up: Linear
    down: Linear


@dataclass
class QwenVision:
    """The vision tower and merger of Qwen2.5-VL (weights as float32 numpy arrays)."""

    heads: int
    full_blocks: tuple[int, ...]  # blocks with full attention; the others attend in windows
    patch: np.ndarray  # (3 * temporal * p * p, d), rows ordered (channel, frame, y, x)
    blocks: list[QwenBlock]
    ln_q: np.ndarray  # the merger's RMSNorm
    mlp0: Linear  # (4d, 4d)
    mlp2: Linear  # (4d, text width)
    patch_size: int = 14
    temporal: int = 2
    merge: int = 2
    window: int = 112  # window attention's side in pixels
    eps: float = 1e-6
    rope_theta: float = 10000.0
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    path: Optional[Path] = None  # the mmproj it was read from

    @property
    def hidden(self) -> int:
        return int(self.patch.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.mlp2[0].shape[1])

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (28 px)."""
        return self.patch_size * self.merge


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The (height, width) Qwen's image processor resizes an image to: sides multiples of
    ``factor``, the pixel count within [min_pixels, max_pixels], the aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an aspect ratio of {max(height, width) / min(height, width):.0f} is "
                         "over Qwen's limit of 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixels(vision: QwenVision, image: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Qwen's processor for an RGB uint8 image already at its processed size (no resize):
    ``(rows (grid_h * grid_w, 3 * temporal * p * p), grid_h, grid_w)``."""
    height, width = image.shape[:2]
    if (height, width) != smart_resize(height, width, vision.factor):
        raise ValueError(f"a {width}x{height} image would be resized by Qwen's processor: give "
                         f"sides that are multiples of {vision.factor} px")
    p, m = vision.patch_size, vision.merge
    x = image.astype(np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    x = (x - np.array(vision.mean, np.float32)[:, None, None]) \
        / np.array(vision.std, np.float32)[:, None, None]
    grid_h, grid_w = height // p, width // p
    x = x.reshape(3, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], vision.temporal, p, p))
    return np.ascontiguousarray(x.reshape(grid_h * grid_w, -1)), grid_h, grid_w


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def rotary(vision: QwenVision, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (grid_h * grid_w, head) in merge-block order."""
    head = vision.hidden // vision.heads
    spatial = head // 2  # half the head for each axis, as rotary pairs (i, i + head / 2)
    inv_freq = np.float32(1) / (np.float32(vision.rope_theta)
                                ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
    m = vision.merge
    hpos, wpos = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    order = (grid_h // m, m, grid_w // m, m)
    hpos = hpos.reshape(order).transpose(0, 2, 1, 3).reshape(-1).astype(np.float32)
    wpos = wpos.reshape(order).transpose(0, 2, 1, 3).reshape(-1).astype(np.float32)
    freqs = np.concatenate([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], axis=1)
    freqs = np.concatenate([freqs, freqs], axis=1)
    return np.cos(freqs), np.sin(freqs)


def windows(vision: QwenVision, grid_h: int, grid_w: int) -> tuple[np.ndarray, list[int]]:
    """Merged tokens grouped window by window (windows in raster order, raster order inside):
    the order of the merged tokens, and each window's start and end in patches."""
    side = vision.window // vision.merge // vision.patch_size
    llm_h, llm_w = grid_h // vision.merge, grid_w // vision.merge
    index = np.arange(llm_h * llm_w).reshape(llm_h, llm_w)
    order: list[np.ndarray] = []
    bounds = [0]
    unit = vision.merge ** 2
    for y in range(0, llm_h, side):
        for x in range(0, llm_w, side):
            cell = index[y:y + side, x:x + side].reshape(-1)
            order.append(cell)
            bounds.append(bounds[-1] + cell.size * unit)
    return np.concatenate(order), bounds


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    turned = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + turned * sin


def _attention(x: np.ndarray, block: QwenBlock, heads: int, cos: np.ndarray, sin: np.ndarray,
               bounds: list[int]) -> np.ndarray:
    n, d = x.shape
    head = d // heads
    qkv = (x @ block.qkv[0] + block.qkv[1]).reshape(n, 3, heads, head)
    q = _rotate(qkv[:, 0], cos[:, None], sin[:, None]).transpose(1, 0, 2)
    k = _rotate(qkv[:, 1], cos[:, None], sin[:, None]).transpose(1, 0, 2)
    v = qkv[:, 2].transpose(1, 0, 2)
    scale = np.float32(head ** -0.5)
    mixed = np.empty((heads, n, head), np.float32)
    for start, end in zip(bounds[:-1], bounds[1:]):
        # a long segment (full attention) one head at a time: its scores are (n, n) each
        step = 1 if end - start > _ALL_HEADS_UP_TO else heads
        for h in range(0, heads, step):
            scores = (q[h:h + step, start:end] @ k[h:h + step, start:end].transpose(0, 2, 1)) \
                * scale
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            mixed[h:h + step, start:end] = scores @ v[h:h + step, start:end]
    return mixed.transpose(1, 0, 2).reshape(n, d) @ block.proj[0] + block.proj[1]


def encode(vision: QwenVision, rows: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Processor rows -> ``(grid_h * grid_w / 4, text width)`` image features, in the raster
    order of the merged 2x2 blocks (the order the language model reads them)."""
    unit = vision.merge ** 2
    n = grid_h * grid_w
    x = np.ascontiguousarray(rows, np.float32) @ vision.patch
    order, bounds = windows(vision, grid_h, grid_w)
    cos, sin = rotary(vision, grid_h, grid_w)

    def by_window(a: np.ndarray) -> np.ndarray:
        return a.reshape(n // unit, unit, -1)[order].reshape(n, -1)

    x, cos, sin = by_window(x), by_window(cos), by_window(sin)
    for i, block in enumerate(vision.blocks):
        segments = [0, n] if i in vision.full_blocks else bounds
        x = x + _attention(rms_norm(x, block.norm1, vision.eps), block, vision.heads, cos, sin,
                           segments)
        h = rms_norm(x, block.norm2, vision.eps)
        hidden = silu(h @ block.gate[0] + block.gate[1]) * (h @ block.up[0] + block.up[1])
        x = x + (hidden @ block.down[0] + block.down[1])
    merged = rms_norm(x, vision.ln_q, vision.eps).reshape(n // unit, -1)
    out = gelu(merged @ vision.mlp0[0] + vision.mlp0[1]) @ vision.mlp2[0] + vision.mlp2[1]
    return np.ascontiguousarray(out[np.argsort(order)])


def embed(vision: QwenVision, image: np.ndarray) -> np.ndarray:
    """An RGB uint8 image (sides multiples of 28) -> its image features."""
    return encode(vision, *pixels(vision, image))


def from_state_dict(state: Mapping[str, np.ndarray], heads: int, full_blocks: tuple[int, ...],
                    prefix: str = "", **options) -> QwenVision:
    """A QwenVision from the weights of transformers' vision model (``patch_embed.proj.weight``,
    ``blocks.N.attn.qkv.weight``, ``merger.mlp.0.weight``...), as float32 numpy arrays."""
    def get(name: str) -> np.ndarray:
        return np.asarray(state[prefix + name], np.float32)

    def linear(name: str) -> Linear:
        return np.ascontiguousarray(get(f"{name}.weight").T), get(f"{name}.bias")

    patch = get("patch_embed.proj.weight")
    count = 1 + max(int(key[len(prefix):].split(".")[1]) for key in state
                    if key.startswith(prefix + "blocks."))
    blocks = [QwenBlock(get(f"blocks.{i}.norm1.weight"), linear(f"blocks.{i}.attn.qkv"),
                        linear(f"blocks.{i}.attn.proj"), get(f"blocks.{i}.norm2.weight"),
                        linear(f"blocks.{i}.mlp.gate_proj"), linear(f"blocks.{i}.mlp.up_proj"),
                        linear(f"blocks.{i}.mlp.down_proj")) for i in range(count)]
    return QwenVision(heads=heads, full_blocks=tuple(full_blocks),
                      patch=np.ascontiguousarray(patch.reshape(patch.shape[0], -1).T),
                      blocks=blocks, ln_q=get("merger.ln_q.weight"),
                      mlp0=linear("merger.mlp.0"), mlp2=linear("merger.mlp.2"),
                      patch_size=int(patch.shape[-1]), temporal=int(patch.shape[2]), **options)
