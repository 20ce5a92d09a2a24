"""The plugin-managed virtual environment: where it lives, which Python builds it, how to use it.

It lives outside the plugin folder (plugin upgrades keep it), one per Python version and
platform: ``~/.local/share/geochat-qgis/venv-py3.11-linux-x86_64`` on Linux,
``~/Library/Application Support/geochat-qgis/...`` on macOS, ``%LOCALAPPDATA%\\geochat-qgis\\...``
on Windows; $GEOCHAT_DEPS_DIR overrides the parent folder. It is made from QGIS's own Python
(same version) WITHOUT QGIS's site packages: the runtime child runs the core there with its own
numpy, GDAL/PROJ/GEOS wheels, never in QGIS's process and never installing into QGIS's Python.
Standard library only: QGIS's process imports this module.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import DepsError
from .locations import base_python_candidates, is_python_name, venv_python, venv_site_packages_glob

DEPS_DIR_ENV = "GEOCHAT_DEPS_DIR"
RUNTIME_PYTHON_ENV = "GEOCHAT_RUNTIME_PYTHON"  # an interpreter that has the runtime (tests, experts)
STAMP = "geochat-env.json"
LineFn = Callable[[str], None]


def data_root() -> Path:
    """The per-user data folder of the plugin (parent of the managed environments)."""
    if os.environ.get(DEPS_DIR_ENV):
        return Path(os.environ[DEPS_DIR_ENV]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "geochat-qgis"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "geochat-qgis"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "geochat-qgis"


def platform_tag() -> str:
    """``py3.11-linux-x86_64``: what an environment must match to be reused."""
    major, minor = sys.version_info[:2]
    return f"py{major}.{minor}-{sys.platform}-{platform.machine().lower() or 'unknown'}"


def _python_version(exe: str) -> Optional[tuple[int, int]]:
    try:
        out = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30, check=True,
                             env=_base_env(), **_no_window()).stdout
        major, minor = out.split()
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def find_base_python() -> str:
    """A Python interpreter of the running version: QGIS's own (inside QGIS ``sys.executable``
    is the QGIS binary on Windows and macOS; see ``locations``); DepsError when none is found."""
    major, minor = sys.version_info[:2]
    names = (f"python{major}.{minor}", f"python{major}", "python")
    candidates = base_python_candidates(
        sys.platform, (major, minor), sys.executable, getattr(sys, "_base_executable", ""),
        sys.base_prefix, sys.prefix, [shutil.which(name) or "" for name in names])
    for exe in candidates:
        if Path(exe).is_file() and _python_version(exe) == (major, minor):
            return exe
    raise DepsError(
        f"No Python {major}.{minor} interpreter was found next to QGIS ({sys.executable}). "
        "Install the matching Python (e.g. the python3-venv package on Debian/Ubuntu), or make "
        f"an environment by hand and set {RUNTIME_PYTHON_ENV} to its python."
    )


@dataclass(frozen=True)
class ManagedEnv:
    """One managed virtual environment (it may not exist yet)."""

    path: Path

    @classmethod
    def default(cls, root: Optional[Path] = None) -> "ManagedEnv":
        return cls((root or data_root()) / f"venv-{platform_tag()}")

    @property
    def python(self) -> Path:
        return Path(venv_python(str(self.path), sys.platform))

    @property
    def exists(self) -> bool:
        return self.python.is_file()

    @property
    def log_path(self) -> Path:
        """The install log (pip's output of every install), read by the diagnostics."""
        return self.path / "install.log"

    def site_packages(self) -> list[Path]:
        return sorted(self.path.glob(venv_site_packages_glob(sys.platform)))

    @property
    def isolated(self) -> bool:
        """Made without QGIS's site packages (older versions of the plugin made it with)."""
        try:
            config = (self.path / "pyvenv.cfg").read_text(encoding="utf-8")
        except OSError:
            return False
        return "include-system-site-packages = true" not in config.replace("True", "true")

    def stamp(self) -> dict:
        try:
            return json.loads((self.path / STAMP).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def create(self, base_python: Optional[str] = None, on_line: Optional[LineFn] = None) -> None:
        """Create the environment (no-op when it exists, is isolated from QGIS's packages and
        matches this Python/platform; an environment made by hand has no stamp: kept too)."""
        if self.exists and self.isolated \
                and self.stamp().get("platform", platform_tag()) == platform_tag():
            return
        base = base_python or find_base_python()
        if on_line:
            on_line(f"Creating the environment {self.path} with {base}")
        result = subprocess.run([base, "-m", "venv", "--clear", str(self.path)],
                                capture_output=True, text=True, env=_base_env(),
                                **_no_window())
        if result.returncode != 0:
            raise DepsError(
                f"Could not create the environment {self.path}: "
                f"{(result.stderr or result.stdout).strip()[-800:]} "
                "On Debian/Ubuntu install the python3-venv package."
            )
        (self.path / STAMP).write_text(json.dumps(
            {"platform": platform_tag(), "base_python": base}), encoding="utf-8")

    def activate(self) -> None:
        """Make the environment's packages importable in this process (in-process backends)."""
        for folder in self.site_packages():
            if str(folder) not in sys.path:
                site.addsitedir(str(folder))


def managed_python(env: Optional[ManagedEnv] = None) -> Optional[str]:
    """The interpreter the runtime child runs: ``$GEOCHAT_RUNTIME_PYTHON`` when set, else the
    managed environment's python when it exists, else None (the runtime is not installed)."""
    override = os.environ.get(RUNTIME_PYTHON_ENV, "").strip()
    if override:
        return override
    env = env or ManagedEnv.default()
    return str(env.python) if env.exists else None


def runtime_python(env: Optional[ManagedEnv] = None) -> str:
    """``managed_python`` or, without a runtime, this interpreter when it is a Python, else a
    matching base Python (then the core's packages are missing: callers check)."""
    found = managed_python(env)
    if found:
        return found
    if is_python_name(Path(sys.executable).name):
        return sys.executable
    return find_base_python()


def _base_env() -> dict[str, str]:
    """This environment without what points a Python at QGIS's own library folders."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
                         "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")}


def _no_window() -> dict:
    """No console window flashing up from QGIS on Windows."""
    return {"creationflags": 0x08000000} if sys.platform == "win32" else {}
