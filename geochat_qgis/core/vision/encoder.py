"""GeoChat image embeddings from an mmproj GGUF, cached per tile for the run.

:class:`ImageEncoder` reads the mmproj once, then turns a tile (any RGB uint8 array) into the
rows the language model takes at the image's place: GeoChat's padding and resize, CLIP
normalisation, the tower and the projector. numpy on the CPU; torch on a CUDA GPU when torch
and CUDA are present (``device`` chooses). The last few tiles' embeddings are kept, so every
prompt and chat turn about a tile encodes it once.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import BackendError, ModelError
from .clip_numpy import encode
from .clip_torch import TorchClip
from .mmproj import ClipVision, read_mmproj
from .preprocess import GEOCHAT_PAD, geochat_image, normalise

log = logging.getLogger(__name__)

CACHE_TILES = 8


def tile_key(image: np.ndarray) -> str:
    """A digest of the tile's pixels and shape (which tile this is, whatever array holds it)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(array.data, digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    return digest.hexdigest()


def cuda_device() -> Optional[str]:
    """"cuda" when torch with CUDA is importable and a GPU answers, else None."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


class ImageEncoder:
    """The project's exact GeoChat encoder for one mmproj."""

    def __init__(self, mmproj: str | Path, device: Optional[str] = None,
                 cache_tiles: int = CACHE_TILES) -> None:
        self.vision: ClipVision = read_mmproj(mmproj)
        self.device = device or cuda_device() or "cpu"
        self._torch = None
        if self.device != "cpu":
            try:
                self._torch = TorchClip(self.vision, self.device)
            except Exception as exc:  # torch raises AssertionError for a CPU-only build
                raise BackendError(
                    f"The image encoder cannot use device {self.device!r} ({exc}): choose "
                    "'cpu', or 'cuda' where torch with CUDA and an NVIDIA GPU are installed."
                ) from exc
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_tiles = cache_tiles
        self._lock = threading.Lock()
        self.encoded = 0  # tiles actually encoded (cache misses), for tests and benchmarks

    @property
    def n_tokens(self) -> int:
        return self.vision.n_tokens

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """The normalised (3, S, S) pixel values GeoChat's processor gives for ``image``."""
        vision = self.vision
        square = geochat_image(image, vision.image_size, GEOCHAT_PAD)
        return normalise(square, vision.mean, vision.std)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Image embeddings for normalised pixels (no cache)."""
        if self._torch is not None:
            return self._torch.encode(pixels)

        return encode(self.vision, pixels)

    def embed(self, image: np.ndarray, key: Optional[str] = None) -> np.ndarray:
        """(n_tokens, text width) float32 embeddings of ``image``, from the cache when seen."""
        key = key or tile_key(image)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            embeddings = self.encode_pixels(self.pixels(image))
        if not np.isfinite(embeddings).all():
            raise ModelError(f"{self.vision.path.name}: its weights give this tile non-finite "
                             "image embeddings (they overflow float32): the file is damaged; "
                             "convert the model again.")
        with self._lock:
            self.encoded += 1
            self._cache[key] = embeddings
            while len(self._cache) > self._cache_tiles:
                self._cache.popitem(last=False)
        return embeddings

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
