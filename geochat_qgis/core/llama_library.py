"""llama-cpp-python, the library itself: whether its build may offload to a GPU here, and
libmtmd's logs routed through its logger. Below both the llama.cpp backend and core/vision
(whose libmtmd encoder and self-test load the same library); llama_cpp loads lazily."""
from __future__ import annotations

import ctypes
import shutil
import sys
from functools import lru_cache
from pathlib import Path


def gpu_present() -> bool:
    """Whether this machine has a GPU that a GPU-enabled llama.cpp build can use."""
    return (
        sys.platform == "darwin"
        or Path("/dev/nvidia0").exists()
        or Path("/dev/kfd").exists()
        or shutil.which("nvidia-smi") is not None
    )


def default_gpu_layers() -> int:
    """-1 (all layers) when llama.cpp was built with GPU offload and a GPU is present, else 0."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() and gpu_present() else 0


@lru_cache(maxsize=None)
def route_mtmd_logs() -> None:
    """Send libmtmd's logs through llama-cpp-python's logger (quiet unless verbose)."""
    from llama_cpp import _logger, mtmd_cpp

    mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
