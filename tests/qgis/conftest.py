"""Real-QGIS fixtures: the plugin as QGIS installs it (from the zip build.py writes)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from qgis.core import QgsSettings

from geochat_qgis.toolbelt.settings import PREFIX

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qgis_runtime import runtime_python  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_build_module():
    """build.py as a module (it is a script at the top of the checkout)."""
    if "geochat_build" not in sys.modules:
        spec = importlib.util.spec_from_file_location("geochat_build", ROOT / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["geochat_build"] = module
        spec.loader.exec_module(module)
    return sys.modules["geochat_build"]


@pytest.fixture(autouse=True)
def clean_plugin_settings():
    """Every test starts from the plugin's default settings and leaves none behind. pytest-qgis
    keeps QGIS's settings in the checkout's .qgis-settings, across tests and across runs, and the
    dock saves what is chosen in it (the model, the backend, seconds per tile): without this a
    test would start from whatever the test before it chose (tiny-geopixel-demo, say), so the
    outcome would depend on the order the tests ran in."""
    QgsSettings().remove(PREFIX)
    yield
    QgsSettings().remove(PREFIX)


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


# ---------------------------------------------------------------- the runtime child
@pytest.fixture(scope="module")
def runtime_cache(tmp_path_factory):
    """A model cache of its own for the shared runtime child of this module (GEOCHAT_CACHE),
    the demo model built there once by the runtime's interpreter. Yields (cache, demo folder)."""
    import os
    import subprocess

    from geochat_qgis.client import close_shared_client

    python = runtime_python()
    cache = tmp_path_factory.mktemp("models")
    saved = os.environ.get("GEOCHAT_CACHE")
    os.environ["GEOCHAT_CACHE"] = str(cache)
    close_shared_client()  # a child started before would not see the cache
    built = subprocess.run(
        [*python, "-c", "from geochat_qgis.core.weights.demo import demo_model_dir; "
                        "print(demo_model_dir())"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    yield cache, Path(built.stdout.strip().splitlines()[-1])
    close_shared_client()
    if saved is None:
        os.environ.pop("GEOCHAT_CACHE", None)
    else:
        os.environ["GEOCHAT_CACHE"] = saved
