"""Real-QGIS fixtures: the plugin as QGIS installs it (from the zip build.py writes)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_build_module():
    """build.py as a module (it is a script at the top of the checkout)."""
    if "geochat_build" not in sys.modules:
        spec = importlib.util.spec_from_file_location("geochat_build", ROOT / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["geochat_build"] = module
        spec.loader.exec_module(module)
    return sys.modules["geochat_build"]


@pytest.fixture(scope="session")
def build_module():
    return load_build_module()


@pytest.fixture(scope="session")
def plugin_zip(build_module, tmp_path_factory) -> Path:
    build_module.DIST = tmp_path_factory.mktemp("dist")
    return build_module.package()


@pytest.fixture(scope="session")
def qgis_profile(build_module, plugin_zip, tmp_path_factory) -> tuple[Path, str]:
    """A temporary QGIS settings folder with the plugin installed and enabled in profile 'test'."""
    qgis_dir = tmp_path_factory.mktemp("qgis-settings")
    build_module.install(plugin_zip, qgis_dir=qgis_dir, profile="test")
    return qgis_dir, "test"
