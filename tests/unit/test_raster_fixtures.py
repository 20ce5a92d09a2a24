"""Generated GeoTIFFs for the raster, tiling, georef and tiles-command tests (no tests here).

Real files written with rasterio: north-up, rotated and sheared transforms in UTM, Web Mercator
and geographic CRSs, with the band types and nodata kinds the tiler must handle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling

# origin, pixel size: a UTM 33N scene near the central meridian, 10 m pixels
UTM = ("EPSG:32633", Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0))
MERCATOR = ("EPSG:3857", Affine(2.0, 0.0, 1000000.0, 0.0, -2.0, 6000000.0))
GEOGRAPHIC = ("EPSG:4326", Affine(0.001, 0.0, 10.0, 0.0, -0.001, 60.0))
# 30 degrees rotation plus a little shear, 5 m pixels
ROTATED = ("EPSG:32633", Affine.translation(500000.0, 5000000.0) @ Affine.rotation(30.0)
           @ Affine.shear(5.0, 0.0) @ Affine.scale(5.0, -5.0))


def gradient(width: int, height: int, count: int = 3, dtype: str = "uint8") -> np.ndarray:
    """Distinct, smoothly varying values per band: (count, height, width)."""
    rows, cols = np.mgrid[0:height, 0:width]
    top = np.iinfo(dtype).max if np.dtype(dtype).kind in "iu" else 1.0
    bands = [((cols * (b + 1) + rows * (3 - b)) % 251) / 250.0 * top for b in range(count)]
    return np.stack(bands).astype(dtype)


def write_raster(path: Path, data: np.ndarray, crs: Optional[str] = UTM[0],
                 transform: Affine = UTM[1], nodata: Optional[float] = None,
                 colorinterp: Optional[Sequence[ColorInterp]] = None, tiled: bool = False,
                 overviews: Sequence[int] = ()) -> Path:
    """Write ``data`` (bands, rows, cols) as a GeoTIFF and return its path."""
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
                   crs=crs, transform=transform, nodata=nodata)
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if colorinterp:
            dst.colorinterp = colorinterp
        if overviews:
            dst.build_overviews(list(overviews), Resampling.average)
    return path
