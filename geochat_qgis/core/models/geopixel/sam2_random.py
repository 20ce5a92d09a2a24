"""Random SAM-2 / text_hidden_fcs tensors that depend only on (seed, checkpoint name, shape).

Numpy only, so GeoPixel's reference environment and the project draw the very same tiny weights
without shipping them: parity test data stores inputs and outputs, not weights. Scales keep a
random model's masks varied (not all one sign): 1 / sqrt(fan-in) for matrices and kernels,
1 + N(0, 0.1) for norm weights and layer scales, N(0, 0.05) for biases, N(0, 1) for SAM's
random-Fourier matrix and the learned tokens.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Mapping, Sequence

import numpy as np

UNIT_SCALE = ("positional_encoding_gaussian_matrix", "_token.weight", "mask_tokens.weight", "point_embeddings.",
              "not_a_point_embed.weight", "no_mask_embed.weight", "no_mem_embed", "no_obj_ptr", "no_mem_pos_enc")


def random_tensor(name: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The float32 tensor named ``name`` (full checkpoint name) of a random model drawn with ``seed``."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    shape = tuple(int(n) for n in shape)
    noise = rng.standard_normal(shape, dtype=np.float32)
    if any(part in name for part in UNIT_SCALE):
        return noise
    if len(shape) == 1:
        if name.endswith(".bias"):
            return noise * np.float32(0.05)
        return np.float32(1.0) + noise * np.float32(0.1)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return noise / np.float32(np.sqrt(max(fan_in, 1)))


def random_tensors(shapes: Mapping[str, Sequence[int]], seed: int = 0,
                   names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """:func:`random_tensor` for each name of ``shapes`` (or of ``names``)."""
    return {name: random_tensor(name, shapes[name], seed) for name in (names if names is not None else shapes)}
