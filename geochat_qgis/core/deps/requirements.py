"""What each backend needs installed, with CUDA or CPU builds chosen from the machine."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from . import DepsError
from .gpu import nvidia_gpus

CUDA_TAG_ENV = "GEOCHAT_CUDA_TAG"  # e.g. cu121, cu124: which CUDA build of torch/llama.cpp
DEFAULT_CUDA_TAG = "cu124"
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
LLAMA_CPP_INDEX = "https://abetlen.github.io/llama-cpp-python/whl/{tag}"
BASE = ("numpy<2", "pillow")  # numpy 2 breaks the GDAL/matplotlib QGIS ships
TRANSFORMERS = ("transformers", "safetensors", "sentencepiece", "protobuf", "jinja2>=3.1.6")


@dataclass(frozen=True)
class PipStep:
    """One ``pip install`` command: packages and where to find them."""

    packages: tuple[str, ...]
    index_url: Optional[str] = None
    extra_index_urls: tuple[str, ...] = ()

    def pip_args(self) -> list[str]:
        args = ["install", *self.packages]
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        return args


@dataclass(frozen=True)
class BackendRequirements:
    backend: str
    accelerator: str  # "cuda" or "cpu"
    steps: tuple[PipStep, ...]
    imports: tuple[str, ...]  # modules a fresh process must import afterwards
    approx_mb: int  # download + install size, for the dialog
    note: str = ""

    def describe(self) -> str:
        packages = ", ".join(p for step in self.steps for p in step.packages)
        return (f"{self.backend} ({self.accelerator}): {packages}; about {self.approx_mb} MB. "
                f"{self.note}").strip()


BACKENDS = ("llama.cpp", "transformers", "geopixel", "openai")


def default_accelerator() -> str:
    """``cuda`` when nvidia-smi finds a GPU, else ``cpu``."""
    return "cuda" if nvidia_gpus() else "cpu"


def requirements_for(backend: str, accelerator: Optional[str] = None) -> BackendRequirements:
    """The packages ``backend`` needs; DepsError for an unknown backend or impossible combo."""
    accelerator = accelerator or default_accelerator()
    if accelerator not in ("cuda", "cpu"):
        raise DepsError(f"Accelerator '{accelerator}' is not one of cuda, cpu.")
    tag = os.environ.get(CUDA_TAG_ENV, DEFAULT_CUDA_TAG) if accelerator == "cuda" else "cpu"
    torch = PipStep(("torch",), index_url=TORCH_INDEX.format(tag=tag))
    if backend == "llama.cpp":
        wheels = "metal" if sys.platform == "darwin" else tag  # Apple GPUs: the Metal build
        return BackendRequirements(
            backend, accelerator,
            (PipStep(("llama-cpp-python", *BASE),
                     extra_index_urls=(LLAMA_CPP_INDEX.format(tag=wheels),)),),
            ("llama_cpp", "numpy", "PIL"), 600 if accelerator == "cuda" else 60,
            "Without a prebuilt wheel for this platform pip compiles llama.cpp (needs a C++ "
            "compiler and CMake; several minutes).",
        )
    if backend == "transformers":
        return BackendRequirements(
            backend, accelerator, (torch, PipStep(TRANSFORMERS + BASE)),
            ("torch", "transformers", "safetensors", "numpy", "PIL"),
            5000 if accelerator == "cuda" else 1000,
        )
    if backend == "geopixel":
        if accelerator != "cuda":
            raise DepsError("GeoPixel runs on an NVIDIA GPU only (CUDA) and none was found "
                            "(nvidia-smi). Use a GeoChat or Qwen2.5-VL model instead.")
        return BackendRequirements(
            backend, accelerator,
            (torch, PipStep(TRANSFORMERS + BASE + ("accelerate", "einops", "timm"))),
            ("torch", "transformers", "einops", "timm", "numpy", "PIL"), 5500,
            "GeoPixel downloads further weights (IXC CLIP, SAM-2) on first load.",
        )
    if backend == "openai":
        return BackendRequirements(backend, accelerator, (), (), 0,
                                   "The server backend needs nothing beyond Python itself.")
    raise DepsError(f"Unknown backend '{backend}': choose one of {', '.join(BACKENDS)}.")
