"""Tiny GeoPixel checkpoints for the GeoPixel tests, each built once per session by the project's
own maker (core/models/geopixel/tiny.py) in the published checkpoint's layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def _build(factory, name: str, **options) -> Path:
    from geochat_qgis.core.models.geopixel.tiny import write_tiny_geopixel

    return write_tiny_geopixel(factory.mktemp("geopixel") / name, **options)


@pytest.fixture(scope="session")
def tiny_geopixel(tmp_path_factory) -> Path:
    """Random weights, seed 0: answers are random text."""
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_geopixel_demo(tmp_path_factory) -> Path:
    """Greedy answer ``<p> a </p> [SEG]</s>`` to any question (one mask)."""
    return _build(tmp_path_factory, "demo", seg_answer="once")


@pytest.fixture(scope="session")
def tiny_geopixel_twice(tmp_path_factory) -> Path:
    """Greedy answer ``<p> a </p> [SEG]`` repeated until max_new_tokens."""
    return _build(tmp_path_factory, "twice", seg_answer="twice")


def real_tile(height: int, width: int, row: int = 0, col: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 window of the demo aerial image (tests/data/cogeo.tif)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(DATA_DIR / "cogeo.tif") as ds:
        bands = ds.read(window=Window(col, row, width, height))
    return np.ascontiguousarray(np.moveaxis(bands, 0, -1)).astype(np.uint8)
