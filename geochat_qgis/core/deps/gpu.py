"""What GPU the machine has, asked of ``nvidia-smi`` (no CUDA library is imported)."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mb: int
    driver: str


def nvidia_gpus(nvidia_smi: Optional[str] = None, timeout: float = 10.0) -> list[Gpu]:
    """The NVIDIA GPUs ``nvidia-smi`` reports; [] when it is missing, fails or finds none."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            gpus.append(Gpu(parts[0], int(parts[1]), parts[2]))
    return gpus
