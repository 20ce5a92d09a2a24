"""Helpers of the "as installed" tier: the zip from ``build.py package`` in a fresh profile of the real QGIS
desktop, started the way a user starts it: no PYTHONPATH, a fresh HOME, nothing of the
project's .venv visible, no GEOCHAT_RUNTIME_PYTHON. The plugin's managed runtime goes into a
temporary folder ($GEOCHAT_DEPS_DIR) and is built there from the package index (pip's own cache
is the user's, so a wheel compiled once is reused).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "default"  # qgis_process reads the default profile
FORBIDDEN = ("shapely", "rasterio", "pyproj", "pyogrio", "geopandas", "torch", "transformers",
             "llama_cpp", "gguf", "PIL")

pytestmark = pytest.mark.xvfb
needs_qgis = pytest.mark.skipif(not shutil.which("xvfb-run") or not shutil.which("qgis"),
                                reason="needs Debian's qgis and xvfb (python3 build.py setup installs them)")


def load_build():
    if "geochat_build" not in sys.modules:
        spec = importlib.util.spec_from_file_location("geochat_build", ROOT / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["geochat_build"] = module
        spec.loader.exec_module(module)
    return sys.modules["geochat_build"]


def pip_cache_dir() -> str:
    """The user's pip cache (a fresh HOME would hide it: llama-cpp-python would compile again)."""
    done = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    return done.stdout.strip() or str(Path.home() / ".cache" / "pip")


class Installed:
    """A fresh QGIS settings folder with the plugin installed from its zip, and the clean
    environment QGIS and qgis_process run in."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.qgis_dir = base / "qgis-settings"
        self.home = base / "home"
        self.deps_dir = base / "geochat-deps"  # the managed runtime goes here
        self.cache = base / "models"
        self.out = base / "out"
        for folder in (self.home, self.out):
            folder.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = base / "xdg-runtime"
        self.runtime_dir.mkdir(mode=0o700, exist_ok=True)
        build = load_build()
        build.DIST = base / "dist"
        self.zip = build.package()
        self.plugin_dir = build.install(self.zip, qgis_dir=self.qgis_dir, profile=PROFILE)

    def env(self, **extra: str) -> dict[str, str]:
        """What a user's session has, and nothing of the checkout's environments."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
            "GEOCHAT_DEPS_DIR": str(self.deps_dir), "GEOCHAT_CACHE": str(self.cache),
            "PIP_CACHE_DIR": pip_cache_dir(), "XDG_RUNTIME_DIR": str(self.runtime_dir),
        }
        # the user's pip settings (where the package index and local wheels are: a machine
        # without internet access has its torch wheel there)
        pip = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT",
               "PIP_DEFAULT_TIMEOUT")
        for name in ("TMPDIR", "CMAKE_ARGS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", *pip):
            if os.environ.get(name):
                env[name] = os.environ[name]
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=OFF")  # the wheel build.py's pip cached
        env.update(extra)
        return env

    def runtime_processes(self) -> list[str]:
        """Command lines of live processes running the managed runtime's interpreter."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.deps_dir) in cmdline and "pip" not in cmdline:
                found.append(f"{entry.name}: {cmdline.strip()}")
        return found

    def runtime_processes_after(self, seconds: float = 20.0) -> list[str]:
        """Live runtime processes once ``seconds`` have passed or none is left: a child whose
        parent has just exited sees its input close and needs a moment to unwind."""
        deadline = time.monotonic() + seconds
        while (found := self.runtime_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return found
