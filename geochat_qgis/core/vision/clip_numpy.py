"""GeoChat's image features in numpy (BLAS matrix products), float32 throughout.

CLIP ViT: patch embedding, CLS first, interpolated position table, pre-layernorm, the encoder
layers up to layer -2 (quick-GELU MLPs), CLS dropped; then the LLaVA projector
``mm.2(gelu(mm.0(x)))`` with the exact (erf) GELU.
"""
from __future__ import annotations

import numpy as np

from .mmproj import ClipVision

_SQRT_HALF = np.float32(0.5 ** 0.5)


def erf(x: np.ndarray) -> np.ndarray:
    """erf in float32 (Abramowitz-Stegun 7.1.26 in float64, |error| < 1.5e-7)."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(np.float32)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * (1 + erf(x / sqrt 2)) / 2."""
    return x * np.float32(0.5) * (np.float32(1) + erf(x * _SQRT_HALF))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x / (np.float32(1) + np.exp(np.float32(-1.702) * x))


def layer_norm(x: np.ndarray, weight: tuple[np.ndarray, np.ndarray], eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(eps)) * weight[0] + weight[1]


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(3, S, S) -> (grid * grid, 3 * patch * patch), rows in raster order."""
    channels, size, _ = pixels.shape
    grid = size // patch
    blocks = pixels.reshape(channels, grid, patch, grid, patch).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(blocks.reshape(grid * grid, channels * patch * patch))


def _attention(x: np.ndarray, layer, heads: int) -> np.ndarray:
    n, d = x.shape
    head = d // heads
    qkv = x @ layer.qkv[0] + layer.qkv[1]
    qkv = qkv.reshape(n, 3, heads, head).transpose(1, 2, 0, 3)  # (3, heads, n, head)
    q = qkv[0] * np.float32(head ** -0.5)
    scores = q @ qkv[1].transpose(0, 2, 1)
    scores -= scores.max(-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(-1, keepdims=True)
    mixed = (scores @ qkv[2]).transpose(1, 0, 2).reshape(n, d)
    return mixed @ layer.out[0] + layer.out[1]


def encode(vision: ClipVision, pixels: np.ndarray) -> np.ndarray:
    """(3, S, S) normalised float32 pixels -> (grid * grid, text width) image embeddings."""
    if pixels.shape != (3, vision.image_size, vision.image_size):
        raise ValueError(f"pixels of shape {pixels.shape}, the mmproj takes "
                         f"(3, {vision.image_size}, {vision.image_size})")
    pixels = np.ascontiguousarray(pixels, np.float32)
    patches = patchify(pixels, vision.patch_size) @ vision.patch
    x = np.concatenate([vision.class_embd[None], patches]) + vision.position
    x = layer_norm(x, vision.pre_ln, vision.eps)
    act = quick_gelu if vision.quick_gelu else gelu
    for layer in vision.layers:
        x = x + _attention(layer_norm(x, layer.ln1, vision.eps), layer, vision.heads)
        hidden = act(layer_norm(x, layer.ln2, vision.eps) @ layer.up[0] + layer.up[1])
        x = x + (hidden @ layer.down[0] + layer.down[1])
    features = x[1:]
    projected = gelu(features @ vision.mm0[0] + vision.mm0[1])
    return np.ascontiguousarray(projected @ vision.mm2[0] + vision.mm2[1])
