"""Which interpreter runs the runtime child, how it is started, and whether it can run the core.

Resolution: ``$GEOCHAT_RUNTIME_PYTHON`` first (a path, or a command line such as
``/usr/bin/python3 -I``), else the plugin's managed environment (core/deps). The child gets the
plugin's parent folder as its only ``PYTHONPATH`` entry: nothing of QGIS's Python paths or
GDAL/PROJ data settings leaks into it (its wheels bring their own).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .errors import INSTALL_HINT
from .results import RuntimeState

RUNTIME_PYTHON_ENV = "GEOCHAT_RUNTIME_PYTHON"
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding geochat_qgis/
# what the core imports at all (the backends' own packages are checked per backend)
CORE_MODULES = ("geochat_qgis", "numpy", "shapely", "pyproj", "rasterio", "pyogrio", "affine",
                "PIL")
BACKEND_MODULES = {"llama.cpp": ("llama_cpp",), "transformers": ("torch", "transformers"),
                   "geopixel": ("torch", "transformers"), "openai": ()}
# set by QGIS or the OS for QGIS's own libraries; the runtime's wheels bundle theirs
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PROJ_LIB",
                "PROJ_DATA", "GDAL_DATA", "GDAL_DRIVER_PATH", "QGIS_PREFIX_PATH")

_STATES: dict[tuple, RuntimeState] = {}
_STATES_LOCK = threading.Lock()


def runtime_command(python: Optional[str] = None) -> Optional[list[str]]:
    """The interpreter command line (``[exe, args...]``), or None when no runtime is set up."""
    value = python or os.environ.get(RUNTIME_PYTHON_ENV, "").strip()
    if value:
        return [value] if Path(value).is_file() else shlex.split(value)
    managed = managed_python()
    return [managed] if managed else None


def managed_python() -> Optional[str]:
    """The managed environment's interpreter when that environment exists (core/deps)."""
    from ..core.deps.environment import ManagedEnv, managed_python  # stdlib only, like us

    return managed_python(ManagedEnv.default())


def child_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The child's environment: this one without Python/GDAL/PROJ paths, the plugin on the
    path, UTF-8 pipes, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(PYTHONPATH=str(PACKAGE_PARENT), PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def popen_options() -> dict:
    """No console window on Windows; elsewhere its own session (a terminal's Ctrl-C is ours)."""
    if sys.platform == "win32":
        return {"creationflags": 0x08000000}  # CREATE_NO_WINDOW
    return {"start_new_session": True}


_PROBE = ("import importlib.util as u, json, sys\n"
          "names = json.loads(sys.argv[1])\n"
          "print(json.dumps([n for n in names if u.find_spec(n) is None]))")


def runtime_state(python: Optional[str] = None, backend: Optional[str] = None,
                  env: Optional[Mapping[str, str]] = None, refresh: bool = False) -> RuntimeState:
    """Whether the runtime can run (``backend``'s packages too when given). Runs one short
    ``find_spec`` probe in that interpreter; a ready answer is remembered until ``refresh``
    (a missing one is asked again next time: the user may have installed it meanwhile)."""
    command = runtime_command(python)
    if command is None:
        return RuntimeState(False, None, list(CORE_MODULES),
                            "The GeoChat runtime is not installed. " + INSTALL_HINT)
    modules = list(CORE_MODULES) + list(BACKEND_MODULES.get(backend or "", ()))
    key = (tuple(command), tuple(modules), tuple(sorted((env or {}).items())))
    with _STATES_LOCK:
        if not refresh and key in _STATES:
            return _STATES[key]
    state = _probe(command, modules, env)
    with _STATES_LOCK:
        if state.ready:
            _STATES[key] = state
        else:
            _STATES.pop(key, None)
    return state


def _probe(command: Sequence[str], modules: list[str],
           env: Optional[Mapping[str, str]]) -> RuntimeState:
    exe = " ".join(command)
    try:
        done = subprocess.run([*command, "-c", _PROBE, json.dumps(modules)], capture_output=True,
                              text=True, timeout=60, env=child_env(env), **popen_options())
        missing = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 \
            else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return RuntimeState(False, exe, modules, f"The GeoChat runtime {exe} cannot be started "
                                                 f"({exc}). " + INSTALL_HINT)
    if missing is None:
        tail = (done.stderr or done.stdout).strip()[-300:]
        return RuntimeState(False, exe, modules,
                            f"The GeoChat runtime {exe} failed to start ({tail}). " + INSTALL_HINT)
    if missing:
        return RuntimeState(False, exe, missing, f"The GeoChat runtime {exe} lacks "
                                                 f"{', '.join(missing)}. " + INSTALL_HINT)
    return RuntimeState(True, exe, [], f"The GeoChat runtime is ready ({exe}).")
