"""Open a raster, choose its bands and turn windows of it into 8-bit RGB plus a nodata mask.

Bands: by default red, green and blue by colour interpretation, else bands 1-3, else band 1
repeated as grey (coloured through its colour table when it is paletted). Nodata comes from the
band nodata value (all chosen bands equal to it), NaN, an alpha band (0 = transparent) or the
dataset's internal mask (0 = masked). Rasters deeper than 8 bits get one percentile stretch per
channel (:class:`Stretch`), computed once per job from overviews or a sample, so every tile of a
job has the same colours.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import RasterError

# A stretch sample is read at most this many pixels across (from overviews where they exist).
SAMPLE_SIZE = 512
# Without overviews, an area up to this many pixels is read whole for the stretch; a larger one
# is sampled with a grid of small windows, so a 50 GB raster costs the same as a small one.
WHOLE_READ_PIXELS = 4096 * 4096
SAMPLE_GRID, SAMPLE_WINDOW = 8, 128
PERCENTILES = (2.0, 98.0)
# rasterio's own GDAL caches decoded blocks in up to 5 % of RAM by default. A job needs the
# blocks under one row of tiles (so the next row reuses the ones it shares), within these bounds:
# memory then stays independent of the raster's size.
GDAL_CACHE_MIN, GDAL_CACHE_MAX = 32 * 2**20, 256 * 2**20


def open_raster(source: Union[str, Path]):
    """Open ``source`` (a path or any GDAL source string) with rasterio; RasterError if it fails."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    text = str(source)
    if is_plain_path(text) and not Path(text).exists():
        raise RasterError(f"Raster not found: {text}. Check the path.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(text)
    except RasterioError as exc:
        raise RasterError(
            f"Cannot read {text} as a raster ({exc}): give a GDAL-readable raster file."
        ) from exc


def limit_gdal_cache(nbytes: int = GDAL_CACHE_MAX) -> None:
    """Set rasterio's GDAL block cache to ``nbytes`` unless the user set GDAL_CACHEMAX."""
    if "GDAL_CACHEMAX" in os.environ:
        return
    from rasterio.env import set_gdal_config

    set_gdal_config("GDAL_CACHEMAX", int(nbytes))


def is_plain_path(source: str) -> bool:
    """True for a file path; False for GDAL source strings (/vsi..., URLs, DRIVER:...)."""
    return not (source.startswith("/vsi") or "://" in source or ":" in source[2:])


def resolve_bands(ds, bands: Optional[Sequence[int]] = None) -> tuple[int, int, int]:
    """The three 1-based bands that become R, G, B (one band is repeated as grey)."""
    from rasterio.enums import ColorInterp

    if bands is None:
        interp = list(ds.colorinterp)
        rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        if all(c in interp for c in rgb):
            return tuple(interp.index(c) + 1 for c in rgb)  # type: ignore[return-value]
        colour = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
        bands = colour[:3] if len(colour) >= 3 else colour[:1] or [1]
    bands = [int(b) for b in bands]
    missing = [b for b in bands if not 1 <= b <= ds.count]
    if missing:
        raise RasterError(
            f"Band {', '.join(map(str, missing))} does not exist: {ds.name} has {ds.count} "
            f"band(s), numbered 1-{ds.count}."
        )
    if len(bands) == 1:
        return (bands[0],) * 3  # type: ignore[return-value]
    if len(bands) != 3:
        raise RasterError(f"Give one band (grey) or three (R,G,B), not {len(bands)}: {bands}.")
    return tuple(bands)  # type: ignore[return-value]


def band_dtype(ds, bands: Sequence[int]) -> np.dtype:
    """The numpy type of ``bands``; RasterError naming the type and what to do for values the
    tiler cannot stretch into an image (complex SAR data, true/false)."""
    for band in dict.fromkeys(bands):
        name = str(ds.dtypes[band - 1])
        if "complex" in name:
            raise RasterError(
                f"{ds.name}: band {band} holds complex values ({name}, e.g. SAR single-look "
                "complex data), which cannot be shown to a model as an image. Compute an "
                f"amplitude band first, e.g. with the Raster Calculator abs(\"layer@{band}\") "
                "or gdal_calc.py --calc=\"abs(A)\" --type=Float32, and use that raster.")
        if name in ("bool", "bool_"):
            raise RasterError(
                f"{ds.name}: band {band} holds true/false values ({name}), which cannot be "
                "stretched into an image. Convert it to 8 bits first, e.g. with the Raster "
                f"Calculator \"layer@{band}\" * 255 (output type Byte), and use that raster.")
    return np.dtype(ds.dtypes[bands[0] - 1])


@dataclass
class Stretch:
    """A linear map of each channel's ``low..high`` onto 0..255, the same for a whole job.

    8- and 16-bit integers go through per-channel lookup tables (one indexing pass per tile);
    other types are scaled arithmetically.
    """

    lows: tuple[float, float, float]
    highs: tuple[float, float, float]
    _luts: dict = field(default_factory=dict, repr=False, compare=False)

    def scale(self, values: np.ndarray, channel: int) -> np.ndarray:
        """``values`` of one channel mapped to uint8 (NaN becomes 0)."""
        low, high = self.lows[channel], self.highs[channel]
        factor = 255.0 / (high - low) if high > low else 0.0
        with np.errstate(invalid="ignore"):
            scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(factor)
            return np.nan_to_num(np.clip(scaled + 0.5, 0, 255)).astype(np.uint8)

    def _lut(self, channel: int, dtype: np.dtype) -> np.ndarray:
        """Lookup table indexed by the unsigned view of ``dtype`` values."""
        key = (channel, dtype.str)
        if key not in self._luts:
            info = np.iinfo(dtype)
            values = np.arange(info.min, info.max + 1, dtype=np.int32)
            if dtype.kind == "i":  # the unsigned view of min..-1 comes after 0..max
                values = np.roll(values, info.min)
            self._luts[key] = self.scale(values, channel)
        return self._luts[key]

    def apply(self, channels: Sequence[np.ndarray], out: np.ndarray) -> None:
        """Write ``channels`` (three 2-D arrays) stretched into ``out`` (H, W, 3) uint8."""
        for i, values in enumerate(channels):
            if values.dtype.kind in "iu" and values.dtype.itemsize <= 2:
                unsigned = values.view(f"u{values.dtype.itemsize}")
                out[:, :, i] = np.take(self._lut(i, values.dtype), unsigned)
            else:
                out[:, :, i] = self.scale(values, i)


class RasterReader:
    """An open raster that reads windows as 8-bit RGB with their invalid-pixel mask."""

    def __init__(self, source: Union[str, Path], bands: Optional[Sequence[int]] = None):
        from rasterio.enums import ColorInterp, MaskFlags

        self.ds = open_raster(source)
        try:
            self.bands = resolve_bands(self.ds, bands)
            self.dtype = band_dtype(self.ds, self.bands)
        except RasterError:
            self.ds.close()
            raise
        interp = list(self.ds.colorinterp)
        self.alpha = interp.index(ColorInterp.alpha) + 1 if ColorInterp.alpha in interp else None
        self.distinct = list(dict.fromkeys(self.bands))  # each colour band read once
        self.channel_rows = [self.distinct.index(b) for b in self.bands]
        flags = self.ds.mask_flag_enums[self.bands[0] - 1]
        self.use_dataset_mask = self.alpha is None and MaskFlags.per_dataset in flags
        nodata = [self.ds.nodatavals[b - 1] for b in self.distinct]
        self.nodata = nodata if all(v is not None for v in nodata) else None
        self.palette = self._palette(interp)
        self.needs_stretch = self.dtype != np.uint8 and self.palette is None

    def _palette(self, interp: list) -> Optional[np.ndarray]:
        """(entries, 3) uint8 colours of a paletted grey band, else None."""
        from rasterio.enums import ColorInterp

        band = self.bands[0]
        if (len(self.distinct) != 1 or interp[band - 1] != ColorInterp.palette
                or self.dtype not in (np.uint8, np.uint16)):
            return None
        try:
            colormap = self.ds.colormap(band)
        except ValueError:  # no colour table after all
            return None
        table = np.zeros((max(256, max(colormap) + 1), 3), dtype=np.uint8)
        for index, rgba in colormap.items():
            table[index] = rgba[:3]
        return table

    def __enter__(self) -> "RasterReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.ds.close()

    def cache_bytes(self, area_width: int, window_px: int, scale: float) -> int:
        """GDAL block cache that holds the blocks under one row of tiles (plus a margin)."""
        block_h, block_w = self.ds.block_shapes[0]
        level = scale if scale > 1 and self.ds.overviews(self.bands[0]) else 1.0
        across = math.ceil(area_width / level / block_w) + 1
        down = math.ceil(window_px / level / block_h) + 1
        block = block_w * block_h * self.ds.count * self.dtype.itemsize
        return int(min(GDAL_CACHE_MAX, max(GDAL_CACHE_MIN, 1.25 * across * down * block)))

    def read(self, window, out_hw: tuple[int, int],
             resampling) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Raw values of the distinct colour bands (bands, H, W) and the invalid mask (None
        when the raster cannot have invalid pixels)."""
        data = self.ds.read(self.distinct, window=window, out_shape=(len(self.distinct), *out_hw),
                            resampling=resampling)
        return data, self._invalid(window, out_hw, resampling, list(data))

    def read_raw(self, window, out_hw: tuple[int, int],
                 resampling) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The disk half of :meth:`read_rgb` (GDAL work, releases the GIL): an 8-bit raster's
        (H, W, 3) image itself, a deeper one's values as :meth:`read` gives them."""
        if self.palette is not None:  # averaged colour indexes mean nothing
            from rasterio.enums import Resampling

            return self.read(window, out_hw, Resampling.nearest)
        if self.needs_stretch:
            return self.read(window, out_hw, resampling)
        rgb = np.empty((*out_hw, 3), dtype=np.uint8)  # GDAL interleaves the bands itself
        self.ds.read(list(self.bands), window=window, out=rgb.transpose(2, 0, 1),
                     resampling=resampling)
        distinct = [rgb[:, :, self.bands.index(b)] for b in self.distinct]
        return rgb, self._invalid(window, out_hw, resampling, distinct)

    def to_rgb(self, values: np.ndarray, invalid: Optional[np.ndarray],
               stretch: Optional[Stretch], pad_rgb: Sequence[int]) -> tuple[np.ndarray, int]:
        """The CPU half of :meth:`read_rgb`: 8-bit RGB, invalid pixels painted ``pad_rgb``."""
        if self.needs_stretch:
            if stretch is None:
                raise ValueError("rasters deeper than 8 bits need the job's compute_stretch()")
            rgb = np.empty((*values.shape[1:], 3), dtype=np.uint8)
            stretch.apply([values[r] for r in self.channel_rows], rgb)
        elif self.palette is not None:
            rgb = self.palette[values[0]]
        else:
            rgb = values
        count = 0 if invalid is None else int(invalid.sum())
        if count:
            rgb[invalid] = pad_rgb
        return rgb, count

    def read_rgb(self, window, out_hw: tuple[int, int], resampling, stretch: Optional[Stretch],
                 pad_rgb: Sequence[int]) -> tuple[np.ndarray, int]:
        """(H, W, 3) uint8 RGB of ``window`` at ``out_hw``, invalid pixels painted ``pad_rgb``;
        also the number of invalid pixels."""
        return self.to_rgb(*self.read_raw(window, out_hw, resampling), stretch, pad_rgb)

    def _invalid(self, window, out_hw: tuple[int, int], resampling,
                 distinct: list[np.ndarray]) -> Optional[np.ndarray]:
        """Where pixels have no data (alpha 0, masked, nodata in every band, NaN); None when
        the raster cannot have any."""
        masks = []
        if self.alpha is not None:
            masks.append(self.ds.read(self.alpha, window=window, out_shape=out_hw,
                                      resampling=resampling) == 0)
        elif self.use_dataset_mask:
            masks.append(self.ds.read_masks(self.bands[0], window=window, out_shape=out_hw,
                                            resampling=resampling) == 0)
        if self.nodata is not None:
            masks.append(np.logical_and.reduce([
                np.isnan(values) if math.isnan(value) else values == value
                for values, value in zip(distinct, self.nodata)]))
        if self.dtype.kind == "f":
            masks.extend(~np.isfinite(values) for values in distinct)
        return np.logical_or.reduce(masks) if masks else None

    def compute_stretch(self, window) -> Optional[Stretch]:
        """The job's 2-98 percentile stretch over ``window`` (None for 8-bit rasters)."""
        if not self.needs_stretch:
            return None
        samples = self._sample_values(window)
        lows, highs = [], []
        for row in self.channel_rows:
            values = np.concatenate([s[row] for s in samples]) if samples else np.empty(0)
            low, high = np.percentile(values, PERCENTILES) if values.size else (0.0, 0.0)
            if not high > low:  # a constant channel becomes mid-grey
                low, high = low - 0.5, high + 0.5
            lows.append(float(low))
            highs.append(float(high))
        return Stretch(tuple(lows), tuple(highs))  # type: ignore[arg-type]

    def _sample_values(self, window) -> list[list[np.ndarray]]:
        """Valid values per read band from overviews, the whole window or a grid of windows."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        width, height = int(window.width), int(window.height)
        has_overviews = bool(self.ds.overviews(self.bands[0]))
        if has_overviews or width * height <= WHOLE_READ_PIXELS:
            factor = max(1.0, max(width, height) / SAMPLE_SIZE)
            windows = [(window, (max(1, round(height / factor)), max(1, round(width / factor))))]
        else:
            size = SAMPLE_WINDOW
            cols = np.linspace(window.col_off, window.col_off + width - size, SAMPLE_GRID)
            rows = np.linspace(window.row_off, window.row_off + height - size, SAMPLE_GRID)
            windows = [(Window(int(c), int(r), size, size), (size, size))
                       for r in rows for c in cols]
        samples = []
        for win, out_hw in windows:
            try:
                data, invalid = self.read(win, out_hw, Resampling.nearest)
            except RasterioError:
                continue  # a corrupt block: the tiles over it will fail and be reported
            valid = np.ones(out_hw, dtype=bool) if invalid is None else ~invalid
            samples.append([band[valid & np.isfinite(band)] for band in data])
        return samples
