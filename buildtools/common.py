"""What every build step shares: the checkout's paths, the interpreters, messages and the error."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "geochat_qgis"
SYSTEM_PYTHON = "/usr/bin/python3"  # QGIS binds to Debian's Python, not the first on PATH
# .venv: the runtime's own environment (no system site packages), as the plugin's managed
# runtime is: the core, the backends, the test tools. The unit tier runs here.
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
# .venv-qgis: QGIS's Python (system site packages) plus the test tools only, nothing of the
# core: what QGIS's process looks like for a user. The qgis and installed tiers run here.
QGIS_VENV = ROOT / ".venv-qgis"
QGIS_VENV_PYTHON = QGIS_VENV / "bin" / "python"
DIST = ROOT / "dist"
OUT = ROOT / "out"


def say(message: str) -> None:
    print(f"[build] {message}", flush=True)


def shown(path: Path) -> str:
    """A path relative to the checkout when inside it (no machine paths in the output)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


class BuildError(Exception):
    """A step failed; the message says which and what to do."""
