"""Shared test fixtures: paths to the real rasters shipped in tests/data."""
from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def demo_raster() -> Path:
    return DATA_DIR / "cogeo.tif"
