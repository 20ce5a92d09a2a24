"""IXC-2.5's HD transform as GeoPixel's ``evaluate`` runs it, in numpy + PIL (no torch).

GeoPixel opens the tile's PNG with PIL (no ``.convert('RGB')``: an RGB tile stays RGB) and calls
IXC-2.5's ``Image_transform(image, hd_num)`` then ``vis_processor``:

1. A portrait image (width < height) is transposed (x <-> y) and handled as a landscape one.
2. Grid scale: the largest ``s`` with ``s * ceil(s / ratio) <= hd_num`` (``ratio = w / h`` as a
   float), then ``s = max(floor(w / 560), s)``; the new width is ``560 s`` and the new height
   ``int(560 s / ratio)`` (truncated).
3. PIL bilinear resize to that size (torchvision's ``resize`` on a PIL image is PIL's own).
4. White (255) rows appended at the bottom only, up to the next multiple of 560.
5. Transposed back if it was transposed (so a portrait tile's padding lands on its right).
6. ``ToTensor`` (/255 in float32) and CLIP normalisation ((x - mean) / std, float32).

The crop grid is then ``rows x cols`` crops of 560 px, and the image gives
``(rows * cols + 1) * 400 + 1 + (rows + 1) * 20`` tokens (4081 for the 3 x 3 grid of a square
tile at hd_num 9). Past 1680 px a side the grid grows with ``floor(w / 560)`` (a 3920 px tile
gives 7 x 7 crops, 20,161 tokens, and GeoPixel silently cuts the question off), so the backend
refuses larger tiles with :func:`check_tile_size`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...errors import BackendError

CROP = 560  # side of one CLIP crop in pixels
MERGED_SIDE = 20  # 40 x 40 patches of 14 px merged 2 x 2 -> 20 x 20 tokens per crop
DEFAULT_HD_NUM = 9  # GeoPixel's evaluate default
MAX_TILE_SIDE = 1680  # the 3 x 3 grid GeoPixel was trained with; larger tiles are refused
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_VALUE = 255


@dataclass(frozen=True)
class HDLayout:
    """Where a tile of ``height x width`` px goes in the HD transform."""

    transposed: bool  # the tile was portrait and is handled transposed
    resized_height: int  # PIL resize target, in the (possibly transposed) landscape frame
    resized_width: int
    padded_height: int  # the padded image in the tile's own orientation
    padded_width: int

    @property
    def rows(self) -> int:
        """Crops down the padded image."""
        return self.padded_height // CROP

    @property
    def cols(self) -> int:
        """Crops across the padded image."""
        return self.padded_width // CROP

    @property
    def n_tokens(self) -> int:
        """Image embeddings this layout gives (global view, glb_GN, crops, sub_GN separators)."""
        return crop_grid_token_count(self.rows, self.cols)


def crop_grid_token_count(rows: int, cols: int) -> int:
    """Image tokens for a ``rows x cols`` crop grid: ``(hw+1)*400 + 1 + (h+1)*20``."""
    side = MERGED_SIDE
    return (rows * cols + 1) * side * side + 1 + (rows + 1) * side


def _grid_scale(width: int, height: int, hd_num: int) -> int:
    """IXC-2.5's scale for a landscape image: as coded, float ratio and all."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    return max(math.floor(width / CROP), scale)


def hd_layout(height: int, width: int, hd_num: int = DEFAULT_HD_NUM) -> HDLayout:
    """The HD transform's sizes for a tile, computed without touching any pixel."""
    if height < 1 or width < 1:
        raise BackendError(f"The tile is {width} x {height} px: GeoPixel needs at least 1 x 1 px.")
    if hd_num < 1:
        raise BackendError(f"hd_num is {hd_num}: GeoPixel needs at least 1 sub-image (default 9).")
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    ratio = w / h
    new_w = int(_grid_scale(w, h, hd_num) * CROP)
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise BackendError(
            f"The tile is {width} x {height} px: too elongated for GeoPixel's HD transform "
            "(it would be resized to zero pixels). Use a tile closer to square.")
    padded_h = math.ceil(new_h / CROP) * CROP
    if transposed:
        return HDLayout(True, new_h, new_w, new_w, padded_h)
    return HDLayout(False, new_h, new_w, padded_h, new_w)


def image_token_count(height: int, width: int, hd_num: int = DEFAULT_HD_NUM) -> int:
    """How many image embeddings GeoPixel makes of a ``height x width`` tile (4081 for 1680 px)."""
    return hd_layout(height, width, hd_num).n_tokens


def check_tile_size(height: int, width: int, max_side: int = MAX_TILE_SIDE) -> None:
    """Refuse a tile GeoPixel cannot answer well (larger than ``max_side`` px a side)."""
    if height < 1 or width < 1:
        raise BackendError(f"The tile is {width} x {height} px: GeoPixel needs at least 1 x 1 px.")
    if max(height, width) > max_side:
        raise BackendError(
            f"The tile is {width} x {height} px; GeoPixel takes tiles of at most {max_side} px a "
            f"side (larger ones become {image_token_count(height, width)} image tokens on a grid "
            "it was not trained on, and past about 3,900 px GeoPixel silently drops the "
            f"question). Choose a tile size of {max_side} px or less.")


def _as_rgb_uint8(tile: np.ndarray) -> np.ndarray:
    """The tile as a C-contiguous (H, W, 3) uint8 array, or a clear error."""
    arr = np.asarray(tile)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise BackendError(
            f"GeoPixel takes an RGB tile as an (H, W, 3) uint8 array, got shape {arr.shape} "
            f"dtype {arr.dtype}. Choose three bands (RGB) scaled to 0-255.")
    return np.ascontiguousarray(arr)


def hd_padded_image(tile: np.ndarray, hd_num: int = DEFAULT_HD_NUM) -> np.ndarray:
    """The resized, white-padded (H', W', 3) uint8 image IXC-2.5 feeds CLIP, before normalising."""
    rgb = _as_rgb_uint8(tile)
    layout = hd_layout(rgb.shape[0], rgb.shape[1], hd_num)
    work = rgb.transpose(1, 0, 2) if layout.transposed else rgb
    size = (layout.resized_width, layout.resized_height)
    if (work.shape[1], work.shape[0]) != size:
        resized = Image.fromarray(np.ascontiguousarray(work)).resize(size, Image.Resampling.BILINEAR)
        work = np.asarray(resized)
    pad_rows = math.ceil(work.shape[0] / CROP) * CROP - work.shape[0]
    padded = np.pad(work, ((0, pad_rows), (0, 0), (0, 0)), constant_values=PAD_VALUE)
    out = padded.transpose(1, 0, 2) if layout.transposed else padded
    return np.ascontiguousarray(out)


def clip_normalise(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, as ``ToTensor`` then ``Normalize`` compute it."""
    chw = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((chw - mean) / std)


def hd_transform(tile: np.ndarray, hd_num: int = DEFAULT_HD_NUM) -> np.ndarray:
    """The normalised padded (3, H', W') float32 image GeoPixel cuts into 560 px CLIP crops."""
    return clip_normalise(hd_padded_image(tile, hd_num))
