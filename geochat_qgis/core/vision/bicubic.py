"""GeoChat's pad-then-resize for tiles too large to pad: PIL's bicubic, bit for bit, in numpy.

PIL resizes a square in two passes (rows, then columns) with fixed-point filter weights (22
bits) and 8-bit rounding between the passes (Pillow's libImaging/Resample.c). The padded square's
rows outside the tile are all the fill colour, and so are the columns beside it, so each pass
needs only the tile's own pixels and one fill value: a 20000 x 300 tile costs what its pixels
cost, not the 1.2 GB square PIL would be handed. :func:`pad_resize` equals
``Image.fromarray(pad_to_square(image)).resize((size, size), BICUBIC)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_BITS = 22  # Pillow's PRECISION_BITS (32 - 8 - 2)
_HALF = 1 << (_BITS - 1)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic filter (a = -0.5), the same float64 operations in the same order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first input index, taps, fixed-point weights (out, ksize)) of one pass, as Pillow's
    precompute_coeffs and normalize_coeffs_8bpc compute them."""
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    taps = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    index = np.arange(ksize)
    used = index[None, :] < taps[:, None]
    kernel = np.where(used, _bicubic(((index[None, :] + first[:, None]) - center[:, None] + 0.5)
                                     * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for j in range(ksize):  # Pillow sums in order
        total += kernel[:, j]
    kernel = np.where(total[:, None] != 0.0, kernel / np.where(total == 0, 1, total)[:, None],
                      kernel)
    scaled = kernel * float(1 << _BITS)
    fixed = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled))
    return first, taps, fixed.astype(np.int64)


def _pass(values: np.ndarray, fill: np.ndarray, start: int, side: int, out_size: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """One pass along axis 0 of ``values`` (the tile's lines, at ``start`` in a line of
    ``side`` px padded with ``fill``): (the tile's lines resampled, a fill line resampled)."""
    first, taps, kernel = weights(side, out_size)
    fill = fill.astype(np.int64)
    sums = kernel.sum(1).reshape((-1,) + (1,) * fill.ndim)
    constant = np.clip((_HALF + sums * fill) >> _BITS, 0, 255)
    out = np.empty((out_size,) + values.shape[1:], np.uint8)
    end = start + len(values)
    for x in range(out_size):
        lo, hi = max(first[x], start), min(first[x] + taps[x], end)
        k = kernel[x, : taps[x]]
        if lo >= hi:
            out[x] = constant[x]
            continue
        inside = k[lo - first[x]: hi - first[x]]
        # float64 sums of 8-bit values times 23-bit weights are exact integers (BLAS speed)
        block = np.ascontiguousarray(values[lo - start: hi - start], np.float64)
        part = (inside.astype(np.float64) @ block.reshape(len(block), -1)).reshape(block.shape[1:])
        acc = _HALF + (k.sum() - inside.sum()) * fill + part.astype(np.int64)
        out[x] = np.clip(acc >> _BITS, 0, 255)
    return out, constant


def pad_resize(image: np.ndarray, size: int, fill: Sequence[int]) -> np.ndarray:
    """(size, size, 3) uint8: ``image`` (H, W, 3 uint8) centred on a square of ``fill`` and
    resized with PIL's bicubic, without building the square."""
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    colour = np.asarray(fill, np.int64)
    # horizontal pass (Pillow's first): the tile's rows, and the fill rows above and below
    rows, fill_row = _pass(np.ascontiguousarray(image.transpose(1, 0, 2)), colour, left, side,
                           size)
    rows = np.ascontiguousarray(rows.transpose(1, 0, 2))  # (height, size, 3)
    # vertical pass over rows [0, side): the tile's rows at ``top``, fill rows elsewhere
    out, _ = _pass(rows, fill_row, top, side, size)
    return out
