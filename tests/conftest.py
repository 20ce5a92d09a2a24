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


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random-weight GeoChat as GGUF (model.gguf + mmproj.gguf), built once per session
    with the project's own converter: the same path a real 7B checkpoint takes."""
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    return build_tiny_geochat(tmp_path_factory.mktemp("tiny") / "gguf", "gguf", seed=0)
