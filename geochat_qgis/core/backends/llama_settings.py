"""The llama.cpp backend's load settings and their checks (a hand-written request may carry
anything)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import BackendError

VISION_CHOICES = ("auto", "project", "libmtmd")


@dataclass
class LlamaCppSettings:
    """llama.cpp load settings. ``None`` means: choose for this machine."""

    n_ctx: int = 2048  # GeoChat: 1296 image tokens + prompt + answer
    n_threads: Optional[int] = None  # None: llama-cpp-python's default (half the cores)
    n_gpu_layers: Optional[int] = None  # None: all layers when the build and a GPU allow it
    n_batch: int = 512
    verbose: bool = False
    kv_f32: bool = False  # float32 KV cache: exact work, twice the KV memory (default float16)
    #: who encodes GeoChat's images: "auto" (libmtmd only when its self-test passes),
    #: "project" (always the project's encoder), "libmtmd" (always libmtmd: comparisons only).
    #: Qwen2.5-VL: "auto" and "libmtmd" encode on libmtmd ("auto" runs its self-test and
    #: reports a failure); "project" computes Qwen's exact features in numpy (slower) and
    #: llama.cpp decodes them (tiles that need a resize stay on libmtmd)
    vision: str = "auto"
    vision_device: Optional[str] = None  # the project's encoder: "cpu", "cuda"; None: CUDA if any


MAX_CTX = 1 << 20


def check_settings(settings: LlamaCppSettings) -> None:
    """BackendError for a setting of the wrong type or range (a hand-written request)."""
    def whole(name: str, low: int, high: int, optional: bool = False) -> None:
        value = getattr(settings, name)
        if optional and value is None:
            return
        if isinstance(value, float) and value.is_integer():  # a form's number field: 4096.0
            value = int(value)
            setattr(settings, name, value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BackendError(f"{name} must be a whole number from {low} to {high}, not "
                               f"{value!r}.")

    whole("n_ctx", 1, MAX_CTX)
    whole("n_batch", 1, MAX_CTX)
    whole("n_threads", -(1 << 31), (1 << 31) - 1, optional=True)  # llama.cpp's int32
    whole("n_gpu_layers", -(1 << 31), (1 << 31) - 1, optional=True)  # negative: all layers
    if not isinstance(settings.kv_f32, bool):
        raise BackendError(f"kv_f32 must be true or false, not {settings.kv_f32!r}.")
