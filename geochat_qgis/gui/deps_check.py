"""Are a backend's packages importable for the runtime the plugin will use? No widgets here.

The check is cheap: ``importlib.util.find_spec`` finds a module without importing it. For the
subprocess runtime it runs in the runtime child's interpreter (one short process, no pip); for the
in-process runtime it runs here, after adding the managed environment's packages to this Python.
A backend found ready is remembered for its interpreter until :func:`forget` (the installer dialog
calls it); a missing one is checked again on the next call, so packages installed by hand count.
The GPU answer (``nvidia-smi``) is asked once per QGIS session.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import subprocess
import sys
from typing import Optional, Sequence

from ..core.deps.environment import ManagedEnv, runtime_python
from ..core.deps.gpu import Gpu, nvidia_gpus
from ..core.deps.requirements import BackendRequirements, requirements_for

# prints the modules that cannot be found, space separated
_FIND_SPECS = r"""
import importlib.util, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
print(" ".join(m for m in sys.argv[1:] if not found(m)))
"""
_READY: set[tuple[str, str, str]] = set()  # (backend, runtime, interpreter) found importable


@functools.lru_cache(maxsize=1)
def detected_gpus() -> tuple[Gpu, ...]:
    """The NVIDIA GPUs of this machine (asked of nvidia-smi once)."""
    return tuple(nvidia_gpus())


def accelerator(device: str = "auto") -> str:
    """``cpu`` or ``cuda``: the build to install for the plugin's device setting."""
    if device in ("cpu", "cuda"):
        return device
    return "cuda" if detected_gpus() else "cpu"


def forget() -> None:
    """Drop the remembered answers (after an install, the next check looks again)."""
    _READY.clear()


def _missing_in(python: str, modules: Sequence[str]) -> list[str]:
    """The ``modules`` that ``python`` cannot find, with the environment the runtime child gets."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
    try:
        result = subprocess.run([python, "-c", _FIND_SPECS, *modules], capture_output=True,
                                text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError):
        return list(modules)
    return result.stdout.split() if result.returncode == 0 else list(modules)


def _missing_here(modules: Sequence[str]) -> list[str]:
    """The ``modules`` this process cannot find once the managed environment is on its path."""
    env = ManagedEnv.default()
    if env.exists:
        env.activate()
    importlib.invalidate_caches()  # a fresh install into a folder already on sys.path
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def missing_for(backend: str, runtime: Optional[str] = None, device: Optional[str] = None
                ) -> Optional[BackendRequirements]:
    """None when ``backend``'s modules are importable for ``runtime`` (``subprocess`` or
    ``inprocess``), else what to install (CPU or CUDA build from ``device``).

    ``runtime`` and ``device`` default to the plugin settings. DepsError for an unknown backend
    or an impossible combination (GeoPixel without a GPU), with what to do in its message.
    """
    if runtime is None or device is None:
        from ..toolbelt.settings import PluginSettings

        settings = PluginSettings.load()
        runtime = runtime or settings.runtime
        device = device or settings.device
    requirements = requirements_for(backend, accelerator(device))
    if not requirements.imports:
        return None
    python = sys.executable if runtime == "inprocess" else runtime_python()
    key = (backend, runtime, python)
    if key in _READY:
        return None
    if runtime == "inprocess":
        missing = _missing_here(requirements.imports)
    else:
        missing = _missing_in(python, requirements.imports)
    if missing:
        return requirements
    _READY.add(key)
    return None
