"""Which model the dock runs: the choices it lists, their status, and the BackendSpec to load.

No widgets here: the dock shows what these functions return.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.backends.factory import BackendSpec, resolve_spec
from ..core.errors import GeoChatError
from ..core.weights.demo import DEMO_NAME, DEMO_NOTE, demo_model_dir
from ..toolbelt.settings import PluginSettings

READY, MISSING, NEEDS_GPU, SERVER, NOT_FOUND = "ready", "not downloaded", "needs a GPU", "server", "not found"
UNREACHABLE = "server unreachable"


def check_server(spec: BackendSpec) -> tuple[str, str]:
    """(status, sentence) after asking the server for its models (worker thread: it waits)."""
    from ..core.backends.factory import create_backend

    backend = create_backend(spec)
    try:
        backend.load()  # GET /models: refused, timeout, 401 and 404 each give a clear message
    except GeoChatError as exc:
        return UNREACHABLE, str(exc)
    finally:
        backend.close()
    return READY, f"{spec.settings.get('base_url')} serves '{spec.model}'"


@dataclass(frozen=True)
class ModelChoice:
    key: str  # DEMO_NAME, a catalog name, or a path
    title: str
    family: str = "geochat"
    catalog: bool = False


def model_choices() -> list[ModelChoice]:
    """The demo model, then every catalog model that runs as published."""
    choices = [ModelChoice(DEMO_NAME, "Tiny demo model (random answers)")]
    try:
        from ..core.weights.catalog import load_catalog

        for entry in load_catalog():
            if entry.backends:
                choices.append(ModelChoice(entry.name, entry.title or entry.name, entry.family, True))
    except GeoChatError:
        pass  # a broken user catalog must not break the dock; the CLI reports it
    return choices


def model_status(choice_key: str, settings: PluginSettings) -> tuple[str, str]:
    """(status, sentence) for the dock: ready, not downloaded, needs a GPU, server, not found."""
    if settings.backend == "openai":
        return SERVER, f"served by {settings.server_url} as '{settings.server_model or choice_key}'"
    if choice_key == DEMO_NAME:
        return READY, DEMO_NOTE
    if Path(choice_key).expanduser().exists():
        return READY, f"local model {Path(choice_key).name}"
    from ..core.weights.catalog import load_catalog
    from ..core.weights.store import model_status as stored_status

    catalog = load_catalog()
    if choice_key not in catalog:
        return NOT_FOUND, f"'{choice_key}' is neither a file nor a catalog model"
    entry = catalog.get(choice_key)
    if entry.family == "geopixel":
        from ..core.deps.gpu import nvidia_gpus  # asks nvidia-smi: no torch import in QGIS

        if not nvidia_gpus():
            return NEEDS_GPU, "GeoPixel needs an NVIDIA GPU with CUDA; use a GeoChat GGUF model here"
    if stored_status(entry, settings.cache_dir or None) != "installed":
        return MISSING, f"{entry.title or entry.name} is not downloaded yet"
    return READY, f"{entry.title or entry.name} is downloaded"


def backend_spec(choice_key: str, settings: PluginSettings, api_key: Optional[str] = None) -> BackendSpec:
    """The spec to load for the dock's choice and the plugin settings (GeoChatError if it cannot)."""
    if settings.backend == "openai":
        http = {"base_url": settings.server_url}
        if api_key:
            http["api_key"] = api_key
        family = "geochat" if choice_key == DEMO_NAME else _family_of(choice_key)
        return BackendSpec("openai", settings.server_model or choice_key, family, None, http)
    backend_settings: dict = {}
    if settings.backend == "llama.cpp":
        if settings.threads > 0:
            backend_settings["n_threads"] = settings.threads
        if settings.gpu_layers >= 0:
            backend_settings["n_gpu_layers"] = settings.gpu_layers
    elif settings.backend == "transformers" and settings.device != "auto":
        backend_settings["device"] = settings.device
    if choice_key == DEMO_NAME:
        return resolve_spec(str(demo_model_dir(settings.cache_dir or None)), "llama.cpp",
                            settings=backend_settings)
    return resolve_spec(choice_key, settings.backend or None, settings.mmproj or None,
                        settings=backend_settings)


def _family_of(choice_key: str) -> str:
    for choice in model_choices():
        if choice.key == choice_key:
            return choice.family
    return "geochat"
