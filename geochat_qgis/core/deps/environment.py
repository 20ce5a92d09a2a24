"""The plugin-managed virtual environment: where it lives, which Python builds it, how to use it.

It lives outside the plugin folder (plugin upgrades keep it), one per Python version and
platform: ``~/.local/share/geochat-qgis/venv-py3.11-linux-x86_64`` on Linux,
``~/Library/Application Support/geochat-qgis/...`` on macOS, ``%LOCALAPPDATA%\\geochat-qgis\\...``
on Windows; $GEOCHAT_DEPS_DIR overrides the parent folder. It is created with
``--system-site-packages`` so it sees what QGIS's Python already has (numpy, GDAL).
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

DEPS_DIR_ENV = "GEOCHAT_DEPS_DIR"
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
                             capture_output=True, text=True, timeout=30, check=True).stdout
        major, minor = out.split()
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def find_base_python() -> str:
    """A Python interpreter of the running version (inside QGIS ``sys.executable`` is often the
    QGIS binary, not Python); DepsError when none is found."""
    major, minor = sys.version_info[:2]
    names = (f"python{major}.{minor}", f"python{major}", "python")
    candidates = [getattr(sys, "_base_executable", ""), sys.executable]
    for folder in (Path(sys.base_prefix) / "bin", Path(sys.base_prefix), Path(sys.prefix) / "bin"):
        candidates += [str(folder / name) for name in names]
        candidates.append(str(folder / "python.exe"))
    candidates += [shutil.which(name) or "" for name in names]
    for exe in dict.fromkeys(c for c in candidates if c):
        if Path(exe).name.lower().startswith("python") and Path(exe).is_file() \
                and _python_version(exe) == (major, minor):
            return exe
    raise DepsError(
        f"No Python {major}.{minor} interpreter was found next to QGIS ({sys.executable}). "
        "Install the matching Python (e.g. the python3-venv package on Debian/Ubuntu) or set "
        "up the environment by hand and point GEOCHAT_DEPS_DIR at its parent folder."
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
        if sys.platform == "win32":
            return self.path / "Scripts" / "python.exe"
        return self.path / "bin" / "python"

    @property
    def exists(self) -> bool:
        return self.python.is_file()

    @property
    def log_path(self) -> Path:
        """The install log (pip's output of every install), read by the diagnostics."""
        return self.path / "install.log"

    def site_packages(self) -> list[Path]:
        if sys.platform == "win32":
            return [self.path / "Lib" / "site-packages"]
        return sorted(self.path.glob("lib/python*/site-packages"))

    def stamp(self) -> dict:
        try:
            return json.loads((self.path / STAMP).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def create(self, base_python: Optional[str] = None, on_line: Optional[LineFn] = None) -> None:
        """Create the environment (no-op when it exists and matches this Python/platform)."""
        if self.exists and self.stamp().get("platform", platform_tag()) == platform_tag():
            return  # reuse it (an environment made by hand has no stamp: keep it too)
        base = base_python or find_base_python()
        if on_line:
            on_line(f"Creating the environment {self.path} with {base}")
        result = subprocess.run(
            [base, "-m", "venv", "--system-site-packages", "--clear", str(self.path)],
            capture_output=True, text=True,
        )
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


def runtime_python(env: Optional[ManagedEnv] = None) -> str:
    """The interpreter the model runtime child runs: the managed environment when it exists,
    else this interpreter when it is a Python, else a matching base Python."""
    env = env or ManagedEnv.default()
    if env.exists:
        return str(env.python)
    if Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    return find_base_python()
