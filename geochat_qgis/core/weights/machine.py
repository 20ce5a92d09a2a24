"""What this machine offers a model: free memory, free disk, and which backends can run here.

Nothing heavy is imported: backends are found with ``importlib.util.find_spec`` and GPUs with
``nvidia-smi`` (core/deps/gpu.py), so the dock can ask cheaply through the runtime.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

# backend -> modules it imports (see core/deps/requirements.py for how to install them)
BACKEND_MODULES = {
    "llama.cpp": ("llama_cpp",),
    "transformers": ("torch", "transformers"),
    "geopixel": ("torch", "transformers"),
}
# model format -> backends that load it (openai: a llama-server / vLLM the user runs)
FORMAT_BACKENDS = {
    "gguf": ("llama.cpp", "openai"),
    "hf": ("transformers", "openai"),
    "safetensors": ("geopixel",),  # GeoPixel converted by `models get` (core/models/geopixel)
}


def _meminfo(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_available() -> Optional[int]:
    """Bytes of memory available to a new process now (None where it cannot be told)."""
    value = _meminfo("MemAvailable")
    if value is not None:
        return value
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def memory_total() -> Optional[int]:
    """Bytes of physical memory (None where it cannot be told)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().total)


def disk_free(folder: Path) -> int:
    """Free bytes on the disk that holds (or will hold) ``folder``."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def backends_here() -> dict[str, Optional[str]]:
    """Each backend -> None when it can run on this machine, else why not (one sentence)."""
    result: dict[str, Optional[str]] = {}
    for backend, modules in BACKEND_MODULES.items():
        missing = [m for m in modules if not _importable(m)]
        result[backend] = (f"not installed ({', '.join(missing)} missing): Raster > GeoChat > "
                           "Install model dependencies" if missing else None)
    result["openai"] = "needs a running llama-server or vLLM server (Settings > server URL)"
    return result


def runnable_backends(fmt: str, memory_bytes: Optional[int] = None,
                      here: Optional[dict[str, Optional[str]]] = None) -> tuple[list[str], dict[str, str]]:
    """Backends that load ``fmt`` and run here (given the ``memory_bytes`` the model needs), and
    the others with the reason they do not."""
    here = backends_here() if here is None else here
    total = memory_total()
    low_memory = bool(memory_bytes and total and total < memory_bytes)
    ok, why_not = [], {}
    for backend in FORMAT_BACKENDS.get(fmt, ()):
        reason = here.get(backend)
        if reason is None and low_memory and backend != "openai":
            reason = (f"needs about {memory_bytes / 1e9:.1f} GB of memory, this machine has "
                      f"{total / 1e9:.1f} GB")
        if reason is None:
            ok.append(backend)
        else:
            why_not[backend] = reason
    return ok, why_not
