"""Tile images as backends take them: checked RGB uint8 arrays, PNG bytes, data URIs."""
from __future__ import annotations

import base64
import io

import numpy as np

from ..errors import BackendError


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous (H, W, 3) uint8 array; raises BackendError otherwise."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise BackendError(
            f"Backends take RGB uint8 images of shape (H, W, 3), got {array.dtype} "
            f"{array.shape}: convert the tile to 8-bit RGB first."
        )
    return np.ascontiguousarray(array)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of an RGB tile (fast compression: the bytes only travel, never persist)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(as_rgb(image), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def png_data_uri(image: np.ndarray) -> str:
    """``data:image/png;base64,...`` for OpenAI-style ``image_url`` content parts."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
