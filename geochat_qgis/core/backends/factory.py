"""Build a backend from (kind, model, settings): the one place front ends and the runtime go through.

A :class:`BackendSpec` is plain data (JSON-serialisable through :meth:`BackendSpec.to_dict`), so
the subprocess runtime can send it to its child and build the same backend there.
:class:`BackendCache` keeps the last loaded backend so a second request reuses the loaded model.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any, Callable, Optional

from ..errors import BackendError, ModelError
from ..weights.catalog import load_catalog
from .base import Backend
from .geopixel import GeoPixelBackend, GeoPixelSettings
from .gguf_files import resolve_gguf_pair
from .llama_cpp import LlamaCppBackend
from .llama_settings import LlamaCppSettings
from .openai_http import HttpSettings, OpenAIHttpBackend
from .transformers_backend import TransformersBackend, TransformersSettings

KINDS = ("llama.cpp", "transformers", "openai", "geopixel")
_ALIASES = {"llama_cpp": "llama.cpp", "llamacpp": "llama.cpp", "gguf": "llama.cpp",
            "hf": "transformers", "http": "openai", "server": "openai"}
#: GGUF architectures of text models and the family that runs them
_GGUF_FAMILIES = {"qwen2vl": "qwen2.5-vl", "qwen25vl": "qwen2.5-vl"}


@dataclass(frozen=True)
class BackendSpec:
    """Which backend, which model, which settings.

    ``model``: a GGUF file or folder (llama.cpp), a checkpoint folder (transformers), the
    server's model name (openai), the weights folder (geopixel). ``settings`` are the fields of
    the backend's settings dataclass (e.g. ``n_ctx``, ``base_url``, ``device``, ``source``).
    """

    kind: str
    model: str
    family: str = "geochat"
    mmproj: Optional[str] = None
    settings: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackendSpec":
        return cls(**data)


def normalise_kind(kind: str) -> str:
    """The canonical backend name for ``kind`` (accepts aliases such as ``llama_cpp``, ``hf``)."""
    key = kind.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in KINDS:
        raise BackendError(f"Unknown backend '{kind}': choose one of {', '.join(KINDS)}.")
    return key


def infer_kind(model: str, server_url: Optional[str] = None) -> str:
    """The backend a model reference implies: a server URL, a checkpoint folder or a GGUF."""
    if server_url:
        return "openai"
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.gguf")):
        return "geopixel" if is_geopixel_folder(path) else "transformers"
    return "llama.cpp"


def is_geopixel_folder(path: Path) -> bool:
    """Whether ``path/config.json`` is a GeoPixel checkpoint's (published or converted)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    names = " ".join(str(a) for a in config.get("architectures") or [])
    return "GeoPixel" in names or (config.get("model_type") == "internlm2" and "out_dim" in config)


def resolve_spec(model: str, kind: Optional[str] = None, mmproj: Optional[str] = None,
                 family: Optional[str] = None, settings: Optional[dict[str, Any]] = None
                 ) -> BackendSpec:
    """A spec from what a user gives: a path (file or folder), a catalog name or a server model.

    ``kind`` None: inferred (a ``base_url`` setting means the server; a checkpoint folder
    transformers; a GGUF llama.cpp; a catalog entry its first backend). ``family`` None: from
    the catalog entry or the GGUF's architecture, else GeoChat. Raises ModelError for a model
    that is neither a path nor a downloaded catalog entry, and for bad GGUF files.
    """
    settings = dict(settings or {})
    kind = normalise_kind(kind) if kind else None
    if kind == "openai" or (kind is None and settings.get("base_url")):
        return BackendSpec("openai", model, family or "geochat", None, settings)
    path = Path(model).expanduser()
    if not path.exists():
        return _catalog_spec(model, kind, mmproj, family, settings)
    kind = kind or infer_kind(str(path))
    if kind == "llama.cpp" and family is None:
        text, _ = resolve_gguf_pair(path, mmproj)
        family = _GGUF_FAMILIES.get(text.architecture, "geochat")
    default_family = "geopixel" if kind == "geopixel" else "geochat"
    return BackendSpec(kind, str(path), family or default_family,
                       str(Path(mmproj).expanduser()) if mmproj else None, settings)


def _catalog_spec(name: str, kind: Optional[str], mmproj: Optional[str],
                  family: Optional[str], settings: dict[str, Any]) -> BackendSpec:
    catalog = load_catalog()
    if name not in catalog:
        raise ModelError(
            f"'{name}' is neither a model file or folder nor a model in the catalog "
            f"({', '.join(catalog.names())}). Check the path, or list models with "
            "`python -m geochat_qgis models list`."
        )
    entry = catalog.get(name)
    if not entry.backends:
        raise ModelError(
            f"Model '{name}' cannot run as published ({entry.format}); convert it first"
            f"{': ' + entry.convert['command'] if entry.convert else ''}."
        )
    folder = entry.local_dir()
    if not folder.exists():
        raise ModelError(
            f"Model '{name}' is not downloaded yet. Download it with "
            f"`python -m geochat_qgis models download {name}`."
        )
    kind = kind or normalise_kind(entry.backends[0])
    model_path, projector = folder, mmproj
    if entry.format == "gguf":
        model_path = entry.path_of("model")
        projector = projector or str(entry.path_of("mmproj"))
    return BackendSpec(kind, str(model_path), family or entry.family, projector, settings)


def _settings(cls: type, values: dict[str, Any], kind: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise BackendError(
            f"Unknown setting(s) for the {kind} backend: {', '.join(unknown)}. "
            f"Known: {', '.join(sorted(names))}."
        )
    return cls(**values)


# kind -> (backend class, its settings dataclass); the classes import no model library until
# they load
BACKEND_CLASSES: dict[str, tuple[type, type]] = {
    "llama.cpp": (LlamaCppBackend, LlamaCppSettings),
    "transformers": (TransformersBackend, TransformersSettings),
    "openai": (OpenAIHttpBackend, HttpSettings),
    "geopixel": (GeoPixelBackend, GeoPixelSettings),
}


def create_backend(spec: BackendSpec) -> Backend:
    """A new, unloaded backend for ``spec`` (call ``load()`` or use it as a context manager)."""
    spec = dataclasses.replace(spec, kind=normalise_kind(spec.kind))
    if spec.kind not in BACKEND_CLASSES:
        raise BackendError(f"Unknown backend '{spec.kind}': choose one of {', '.join(KINDS)}.")
    backend, settings = BACKEND_CLASSES[spec.kind]
    if spec.kind == "llama.cpp":
        return backend(spec.model, spec.mmproj, spec.family,
                       _settings(settings, spec.settings, spec.kind))
    return backend(spec.model, spec.family, _settings(settings, spec.settings, spec.kind))


class BackendCache:
    """Holds one loaded backend; asking again with the same spec returns it without reloading."""

    def __init__(self, factory: Optional[Callable[[BackendSpec], Backend]] = None) -> None:
        self._factory = factory or create_backend  # e.g. a subprocess runtime's opener
        self._lock = threading.Lock()
        self._spec: Optional[BackendSpec] = None
        self._backend: Optional[Backend] = None
        self._files: tuple[tuple[str, int, int], ...] = ()

    def get(self, spec: BackendSpec) -> Backend:
        """The loaded backend for ``spec``; a different spec closes the previous one first.

        So does the same spec whose model files changed on disk since it was loaded (a model
        converted or downloaded again to the same path): the old weights are not reused.
        """
        with self._lock:
            files = model_files_state(spec)
            if self._backend is not None and self._spec == spec and self._files == files:
                return self._backend
            self.clear_locked()
            backend = self._factory(spec)
            backend.load()
            self._spec, self._backend, self._files = spec, backend, files
            return backend

    def clear(self) -> None:
        """Close and forget the loaded backend (frees its memory)."""
        with self._lock:
            self.clear_locked()

    def clear_locked(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._spec = self._backend = None
        self._files = ()


def model_files_state(spec: BackendSpec) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of the local files ``spec`` loads: its model file or the files of
    its model folder, and its mmproj; empty for a server model name. Cheap: stat calls only."""
    state: list[tuple[str, int, int]] = []
    for name in (spec.model, spec.mmproj):
        if not name or spec.kind == "openai":
            continue
        path = Path(name).expanduser()
        try:
            entries = sorted(path.iterdir()) if path.is_dir() else [path]
            for entry in entries:
                info = entry.stat()
                if S_ISREG(info.st_mode):
                    state.append((str(entry), info.st_size, info.st_mtime_ns))
        except OSError:  # vanished or unreadable: the load that follows says so
            state.append((str(path), -1, -1))
    return tuple(state)
