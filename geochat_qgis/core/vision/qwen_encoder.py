"""Qwen2.5-VL image features computed by the project and decoded by llama.cpp.

:class:`QwenImageEncoder` reads a ``qwen2.5vl_merger`` mmproj once and computes a tile's features
exactly as Qwen2.5-VL does (core/vision/qwen_numpy.py, numpy on the CPU), the last few tiles
cached. :class:`OwnImageChunks` stands in for llama-cpp-python's ``mtmd_cpp`` module inside the
Qwen chat handler: libmtmd still tokenizes the prompt (image markers, token grid), but an image
chunk is decoded from the project's features with ``mtmd_helper_decode_image_chunk``, so llama.cpp
itself sets the M-RoPE image positions. Only tiles Qwen's processor and libmtmd both take
unresized (sides multiples of 28, 8 to 4096 merged tokens) go this way; others stay on libmtmd.
"""
from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .encoder import CACHE_TILES, ImageEncoder
from .qwen_mmproj import read_qwen_mmproj
from .qwen_numpy import encode, pixels, smart_resize

#: libmtmd's Qwen2.5-VL limits in merged tokens (clip.cpp: set_limit_image_tokens(8, 4096))
LIBMTMD_TOKENS = (8, 4096)


class QwenImageEncoder(ImageEncoder):
    """The project's exact Qwen2.5-VL features for one mmproj (numpy on the CPU), cached per
    tile as :class:`ImageEncoder` caches GeoChat's."""

    def __init__(self, mmproj: str | Path, cache_tiles: int = CACHE_TILES) -> None:
        self.vision = read_qwen_mmproj(mmproj)
        self.device, self._torch = "cpu", None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_tiles = cache_tiles
        self._lock = threading.Lock()
        self.encoded = 0

    def takes(self, image: np.ndarray) -> bool:
        """Whether neither Qwen's processor nor libmtmd would resize ``image``."""
        height, width = image.shape[:2]
        factor = self.vision.factor
        low, high = (n * factor * factor for n in LIBMTMD_TOKENS)
        return (height, width) == smart_resize(height, width, factor, low, high)

    def pixels(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Qwen's processor rows and patch grid for a tile it takes unresized."""
        return pixels(self.vision, image)

    def encode_pixels(self, pixels: tuple[np.ndarray, int, int]) -> np.ndarray:
        return np.ascontiguousarray(encode(self.vision, *pixels), np.float32)


class OwnImageChunks:
    """llama-cpp-python's ``mtmd_cpp`` with image chunks decoded from given features.

    ``features`` is set per prompt (one image: the tile); ``None`` leaves libmtmd to encode.
    ``unpositioned`` counts, since the last :meth:`start`, the image tokens that took no
    position of their own: an M-RoPE image of h x w tokens advances the position by max(h, w),
    so the handler's ``n_tokens`` undercounts the prompt by the difference."""

    def __init__(self, mtmd: Any) -> None:
        self._mtmd = mtmd
        self.features: Optional[np.ndarray] = None
        self.decoded = 0  # image chunks decoded from the project's features
        self.unpositioned = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mtmd, name)

    def start(self, features: Optional[np.ndarray] = None) -> None:
        """A new prompt: its image features (or None: libmtmd encodes), nothing counted yet."""
        self.features, self.unpositioned = features, 0

    def mtmd_helper_eval_chunk_single(self, ctx, lctx, chunk, n_past, seq_id, n_batch,
                                      logits_last, new_n_past) -> int:
        status = self._eval(ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past)
        mtmd = self._mtmd
        if status == 0 and mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            advanced = _pos(new_n_past) - _pos(n_past)
            self.unpositioned += max(0, int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)) - advanced)
        return status

    def _eval(self, ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past) -> int:
        mtmd = self._mtmd
        features = self.features
        if features is None or mtmd.mtmd_input_chunk_get_type(chunk) != \
                mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            return mtmd.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, n_past, seq_id, n_batch,
                                                      logits_last, new_n_past)
        if mtmd.mtmd_input_chunk_get_n_tokens(chunk) != features.shape[0]:
            raise ValueError(f"libmtmd made {mtmd.mtmd_input_chunk_get_n_tokens(chunk)} image "
                             f"tokens, the project's Qwen features have {features.shape[0]}")
        buffer = (ctypes.c_float * features.size).from_buffer(features)
        self.decoded += 1
        no_callback = mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer
        return mtmd.mtmd_helper_decode_image_chunk(ctx, lctx, chunk, buffer, n_past, seq_id,
                                                   n_batch, new_n_past, no_callback, None)


def _pos(value: Any) -> int:
    """A llama_pos given by value, by ``ctypes.byref`` or as a plain int."""
    value = getattr(value, "_obj", value)
    return int(getattr(value, "value", value))
