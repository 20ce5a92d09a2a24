"""What the runtime needs installed: the core's packages plus one backend's, CPU or CUDA builds.

The runtime is the managed environment the runtime child runs (never QGIS's own Python), so its
packages follow their own needs: numpy 2, current shapely, and rasterio/pyproj/pyogrio wheels
that bring their own GDAL, PROJ (with its data) and GEOS. The repository's requirements.txt
lists the same core (tests/unit/test_deps_requirements.py keeps them in step).
"""
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
# "none" (or empty) installs llama-cpp-python from the package index alone (a source build, or a
# wheel pip has cached); another value is the prebuilt-wheel index URL template ({tag}).
LLAMA_CPP_INDEX_ENV = "GEOCHAT_LLAMA_CPP_INDEX"
# the stock release the project is tested with (an sdist on the package index)
LLAMA_CPP = "llama-cpp-python==0.3.36"
# what the core imports (geochat_qgis.core.pipeline and its readers, writers, tokenizers)
CORE = ("numpy", "pillow", "rasterio", "shapely", "pyproj", "pyogrio", "gguf", "psutil",
        "huggingface_hub", "sentencepiece", "protobuf")
CORE_IMPORTS = ("numpy", "PIL", "rasterio", "shapely", "pyproj", "pyogrio", "gguf")
CORE_MB = 420  # the core's packages installed (measured: 481 MB with llama-cpp-python, CPU)
# verified in a fresh process with the plugin's parent folder on its path
CORE_MODULE = "geochat_qgis.core.pipeline"
TRANSFORMERS = ("transformers", "safetensors", "jinja2>=3.1.6")


@dataclass(frozen=True)
class PipStep:
    """One ``pip install`` command: packages and where to find them."""

    packages: tuple[str, ...]
    index_url: Optional[str] = None
    extra_index_urls: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # environment for pip (a source build's CMAKE_ARGS)
    no_deps: bool = False  # the packages alone; a later step brings their dependencies

    def pip_args(self) -> list[str]:
        args = ["install", *self.packages, *(["--no-deps"] if self.no_deps else [])]
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
        packages = ", ".join(dict.fromkeys(p for step in self.steps for p in step.packages))
        return (f"{self.backend} ({self.accelerator}): {packages}; about {self.approx_mb} MB. "
                f"{self.note}").strip()


BACKENDS = ("llama.cpp", "transformers", "geopixel", "openai")
# a converted model's format -> the backend whose packages convert to it: GeoChat's GGUF needs
# no torch (numpy reads the checkpoint), its HF checkpoint transformers, GeoPixel's torch
CONVERTER_BACKENDS = {"gguf": "llama.cpp", "hf": "transformers", "safetensors": "geopixel"}


def default_accelerator() -> str:
    """``cuda`` when nvidia-smi finds a GPU, else ``cpu``."""
    return "cuda" if nvidia_gpus() else "cpu"


def core_step() -> PipStep:
    """The core's packages: the first step of every backend's install."""
    return PipStep(CORE)


def llama_cpp_step(accelerator: str, tag: str) -> PipStep:
    """Stock llama-cpp-python; prebuilt wheels from its index when that is set (CUDA, Metal or
    CPU builds), else a source build (CUDA on when asked for)."""
    template = os.environ.get(LLAMA_CPP_INDEX_ENV, LLAMA_CPP_INDEX).strip()
    wheels = "metal" if sys.platform == "darwin" else tag  # Apple GPUs: the Metal build
    extra = () if template.lower() in ("", "none") else (template.format(tag=wheels),)
    env = (("CMAKE_ARGS", "-DGGML_CUDA=on"),) if accelerator == "cuda" else ()
    return PipStep((LLAMA_CPP,), extra_index_urls=extra, env=env)


def requirements_for(backend: str, accelerator: Optional[str] = None) -> BackendRequirements:
    """The runtime with ``backend``: the core's packages, then the backend's; DepsError for an
    unknown backend or an impossible combination."""
    accelerator = accelerator or default_accelerator()
    if accelerator not in ("cuda", "cpu"):
        raise DepsError(f"Accelerator '{accelerator}' is not one of cuda, cpu.")
    tag = os.environ.get(CUDA_TAG_ENV, DEFAULT_CUDA_TAG) if accelerator == "cuda" else "cpu"
    core = core_step()
    # torch's own build from its index (CPU or CUDA), nothing else from there: its dependencies
    # (and transformers') come from the package index in the next step
    torch = PipStep(("torch",), index_url=TORCH_INDEX.format(tag=tag), no_deps=True)
    with_torch = PipStep(("torch",) + TRANSFORMERS)
    if backend == "llama.cpp":
        return BackendRequirements(
            backend, accelerator, (core, llama_cpp_step(accelerator, tag)),
            CORE_IMPORTS + ("llama_cpp",), CORE_MB + (600 if accelerator == "cuda" else 60),
            "Without a prebuilt wheel for this platform pip compiles llama.cpp (needs a C++ "
            "compiler and CMake; several minutes).",
        )
    if backend == "transformers":
        return BackendRequirements(
            backend, accelerator, (core, torch, with_torch),
            CORE_IMPORTS + ("torch", "transformers", "safetensors"),
            CORE_MB + (5000 if accelerator == "cuda" else 1000),
        )
    if backend == "geopixel":  # the project's own GeoPixel (core/models/geopixel): no clone
        return BackendRequirements(
            backend, accelerator, (core, torch, with_torch),
            CORE_IMPORTS + ("torch", "transformers", "safetensors", "sentencepiece"),
            CORE_MB + (5000 if accelerator == "cuda" else 1000),
            "GeoPixel runs on the CPU (bf16, about 18 GB of memory for the 7B) or an NVIDIA "
            "GPU; its weights come whole from the catalog (nothing is fetched at load).",
        )
    if backend == "openai":
        return BackendRequirements(backend, accelerator, (core,), CORE_IMPORTS, CORE_MB,
                                   "The server backend needs only the core's packages.")
    raise DepsError(f"Unknown backend '{backend}': choose one of {', '.join(BACKENDS)}.")
