"""Tile images as the vision code and the backends take them: checked RGB uint8 arrays."""
from __future__ import annotations

import numpy as np

from .errors import BackendError


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous (H, W, 3) uint8 array; raises BackendError otherwise."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise BackendError(
            f"Backends take RGB uint8 images of shape (H, W, 3), got {array.dtype} "
            f"{array.shape}: convert the tile to 8-bit RGB first."
        )
    return np.ascontiguousarray(array)
