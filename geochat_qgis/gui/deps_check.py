"""Which build the installer offers: CPU or CUDA, from the device setting and the GPUs found.

Whether the runtime is ready is the client's question (``geochat_qgis.client.runtime_state``:
a find_spec probe in the runtime's interpreter, nothing imported into QGIS's Python). The GPU
answer (``nvidia-smi``) is asked once per QGIS session.
"""
from __future__ import annotations

import functools

from ..core.deps.gpu import Gpu, nvidia_gpus  # stdlib only, like core/deps/*


@functools.lru_cache(maxsize=1)
def detected_gpus() -> tuple[Gpu, ...]:
    """The NVIDIA GPUs of this machine (asked of nvidia-smi once)."""
    return tuple(nvidia_gpus())


def accelerator(device: str = "auto") -> str:
    """``cpu`` or ``cuda``: the build to install for the plugin's device setting."""
    if device in ("cpu", "cuda"):
        return device
    return "cuda" if detected_gpus() else "cpu"
