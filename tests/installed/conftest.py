"""Fixtures of the "as installed" tier (helpers in installed_env.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from installed_env import Installed


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    return Installed(tmp_path_factory.mktemp("as-installed"))


@pytest.fixture(scope="session")
def demo_model(installed) -> Path:
    """The tiny demo GGUF folder in the user's model cache. Nothing builds it beforehand: the
    dock's demo run makes the runtime child (the managed llama.cpp runtime, no torch) build it,
    as for a user; tests that need it run after the session."""
    folder = installed.cache / "tiny-demo"
    assert (folder / "model.gguf").is_file() and (folder / "mmproj.gguf").is_file(), (
        f"the runtime did not build the demo model in {folder}")
    return folder


def pytest_collection_modifyitems(config, items) -> None:
    """The GeoPixel session last: its installer adds torch to the one managed runtime this tier
    shares, and the Get tests check that the llama.cpp runtime converts GeoChat without torch."""
    items.sort(key=lambda item: "geopixel" in item.path.name)
