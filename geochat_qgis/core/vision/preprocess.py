"""GeoChat's image preprocessing, done by the project before any backend sees a tile.

GeoChat pads to a square with the CLIP mean colour (``expand2square``, the image centred), then
CLIPImageProcessor resizes the shortest edge to 504 and centre-crops 504 (PIL bicubic), rescales
by 1/255 and normalises with CLIP's mean and std (models.md items 5-6).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import BackendError
from ..families.base import CLIP_MEAN, CLIP_STD
from ..rgb_images import as_rgb
from .bicubic import pad_resize

GEOCHAT_SIZE = 504
GEOCHAT_PAD = (122, 116, 104)  # int(mean * 255), truncated
PAD_IN_PIL = 4096  # larger elongated tiles are padded and resized without the square
MAX_SIDE = 100_000  # a longer tile is refused (its resize alone would take gigabytes)


def tile_rgb(image: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous (H, W, 3) uint8 array of at least one pixel (BackendError)."""
    image = as_rgb(image)
    height, width = image.shape[:2]
    if not height or not width:
        raise BackendError(f"The tile is empty ({width} x {height} px): read an extent that "
                           "holds raster pixels.")
    return image


def pad_to_square(image: np.ndarray, fill: Sequence[int] = GEOCHAT_PAD) -> np.ndarray:
    """``image`` centred on a square of ``fill`` (GeoChat's expand2square: offset (big-small)//2)."""
    image = tile_rgb(image)
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = np.asarray(fill, np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = image
    return square


def geochat_image(image: np.ndarray, size: int = GEOCHAT_SIZE,
                  fill: Sequence[int] = GEOCHAT_PAD) -> np.ndarray:
    """The uint8 ``size`` x ``size`` RGB image GeoChat's processor sees (padded, PIL bicubic).

    An elongated tile whose padded square would be large is resized without building the
    square (core/vision/bicubic.py: the same pixels, bit for bit)."""
    image = tile_rgb(image)
    height, width = image.shape[:2]
    if max(height, width) > MAX_SIDE:
        raise BackendError(f"The tile is {width} x {height} px, more than the image encoder "
                           f"takes ({MAX_SIDE} px a side; GeoChat sees {size} px): read it at a "
                           "coarser resolution (a larger GSD or a smaller tile size).")
    if height != width and max(height, width) > PAD_IN_PIL:
        return pad_resize(image, size, fill)
    square = pad_to_square(image, fill)
    if square.shape[0] == size:
        return square
    from PIL import Image

    resized = Image.fromarray(square, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def normalise(image: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """(3, H, W) float32 pixel values: ``(x / 255 - mean) / std`` as CLIPImageProcessor does."""
    scaled = (as_rgb(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return np.ascontiguousarray(((scaled - mean32) / std32).transpose(2, 0, 1))
