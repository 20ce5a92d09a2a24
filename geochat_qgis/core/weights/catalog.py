"""The model catalog: the models the plugin knows (``models/catalog.json``) plus the user's own.

A user catalog file has the same form (``{"models": [...]}``). Its entries either name another
hub repository (``"repo"``) or a folder on disk (``"path"``, relative paths being relative to the
catalog file). A user entry with a built-in name replaces the built-in one.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from ...__about__ import MODELS_DIR
from ..errors import ModelError
from .safe_names import check_relative, unsafe_reason

BUILTIN_CATALOG = MODELS_DIR / "catalog.json"
USER_CATALOG_ENV = "GEOCHAT_USER_CATALOG"
CACHE_ENV = "GEOCHAT_CACHE"

PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def cache_root(override: Optional[PathLike] = None) -> Path:
    """Where downloads go: ``override`` (the plugin setting), else $GEOCHAT_CACHE, else
    ``~/.cache/geochat-qgis``."""
    chosen = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "geochat-qgis"
    return Path(chosen).expanduser()


def default_user_catalog() -> Path:
    """$GEOCHAT_USER_CATALOG, else ``$XDG_CONFIG_HOME/geochat-qgis/catalog.json``."""
    if os.environ.get(USER_CATALOG_ENV):
        return Path(os.environ[USER_CATALOG_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "geochat-qgis" / "catalog.json"


@dataclass(frozen=True)
class ModelFile:
    """One file of a model, ``path`` relative to the repository or local folder."""

    path: str
    size: Optional[int] = None  # exact bytes when known
    approx_size: Optional[int] = None  # for display and the free-space check
    sha256: Optional[str] = None
    role: str = ""  # "model", "mmproj" or "" (part of a checkpoint)

    @property
    def expected_bytes(self) -> int:
        return self.size or self.approx_size or 0


@dataclass(frozen=True)
class ModelEntry:
    """One model: where it comes from, what runs it, what it needs."""

    name: str
    family: str
    files: tuple[ModelFile, ...] = ()
    title: str = ""
    format: str = ""
    repo: Optional[str] = None
    revision: str = "main"
    local_path: Optional[Path] = None
    backends: tuple[str, ...] = ()
    convert: Optional[Mapping[str, Any]] = None
    snapshot: bool = False  # download every file of the repository (custom-code models)
    license: Optional[str] = None
    min_ram_gb: Optional[float] = None
    min_vram_gb: Optional[float] = None
    card: Optional[str] = None
    origin: str = "builtin"

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def total_bytes(self) -> int:
        return sum(f.expected_bytes for f in self.files)

    def local_dir(self, cache: Optional[PathLike] = None) -> Path:
        """The folder holding this model's files: its own path, or its cache folder."""
        if self.local_path is not None:
            return self.local_path
        return cache_root(cache) / "models" / self.name

    def file(self, role: str) -> ModelFile:
        """The file with ``role`` ("model", "mmproj"); ModelError if the entry has none."""
        for item in self.files:
            if item.role == role:
                return item
        raise ModelError(f"Model '{self.name}' has no file with role '{role}' in its catalog entry.")

    def path_of(self, role: str, cache: Optional[PathLike] = None) -> Path:
        """Local path of the file with ``role`` (it may not exist yet)."""
        return self.local_dir(cache) / self.file(role).path

    def card_path(self) -> Optional[Path]:
        return MODELS_DIR / self.card if self.card and self.origin == "builtin" else None


class Catalog:
    """Entries by name, built-in first then the user's (which replace same-named built-ins)."""

    def __init__(self, entries: Sequence[ModelEntry]) -> None:
        self._entries: dict[str, ModelEntry] = {}
        for entry in entries:
            self._entries[entry.name] = entry

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "(none)"
            raise ModelError(
                f"Unknown model '{name}'. Known models: {known}. "
                "Add your own with `python -m geochat_qgis models add`."
            ) from None


def _parse_file(raw: Any, where: str) -> ModelFile:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict) or "path" not in raw:
        raise ModelError(f"{where}: each file needs at least a 'path'.")
    path = check_relative(raw["path"], where)
    sha = raw.get("sha256")
    if sha is not None and not _SHA256.match(str(sha).lower()):
        raise ModelError(f"{where}: sha256 of '{path}' is not 64 hex digits.")
    for key in ("size", "approx_size"):
        if raw.get(key) is not None and (not isinstance(raw[key], int) or raw[key] < 0):
            raise ModelError(f"{where}: '{key}' of '{path}' must be a byte count.")
    return ModelFile(
        path=path,
        size=raw.get("size"),
        approx_size=raw.get("approx_size", raw.get("size")),
        sha256=str(sha).lower() if sha else None,
        role=str(raw.get("role", "")),
    )


def implied_format(files: Sequence[ModelFile], backends: Sequence[str]) -> str:
    """The format an entry that names none is in: a .gguf model file or the llama.cpp backend
    make it gguf, the transformers backend hf, the geopixel backend safetensors ("" else)."""
    kinds = {str(b).strip().lower().replace("_", ".") for b in backends}
    if kinds & {"llama.cpp", "llamacpp", "gguf"} or any(
            f.path.lower().endswith(".gguf") for f in files if f.role in ("model", "")):
        return "gguf"
    return "safetensors" if "geopixel" in kinds else "hf" if kinds & {"transformers", "hf"} else ""


def parse_entry(raw: Mapping[str, Any], origin: str, base_dir: Optional[Path] = None) -> ModelEntry:
    """One catalog entry from its JSON form; ModelError naming the entry when it is malformed."""
    name = str(raw.get("name", ""))
    where = f"catalog {origin}, entry '{name or '?'}'"
    if not _NAME.match(name):
        raise ModelError(f"{where}: 'name' must be letters, digits, '.', '_' or '-'.")
    if unsafe_reason(name):
        raise ModelError(f"{where}: 'name' cannot name the model's folder "
                         f"({unsafe_reason(name)}); choose another name.")
    if not raw.get("family"):
        raise ModelError(f"{where}: 'family' is required (e.g. geochat, qwen2.5-vl, geopixel).")
    repo, local = raw.get("repo"), raw.get("path")
    if bool(repo) == bool(local):
        raise ModelError(f"{where}: give exactly one of 'repo' (hub repository) or 'path' (folder).")
    if repo and (not _REPO.match(str(repo)) or ".." in str(repo)):
        raise ModelError(f"{where}: 'repo' must be a hub repository id like 'owner/name' "
                         "(letters, digits, '.', '_' or '-').")
    revision = str(raw.get("revision", "main"))
    if unsafe_reason(revision):
        raise ModelError(f"{where}: 'revision' '{revision}' is not a branch, tag or commit "
                         f"({unsafe_reason(revision)}).")
    local_path = None
    if local:
        local_path = Path(str(local)).expanduser()
        if not local_path.is_absolute() and base_dir is not None:
            local_path = base_dir / local_path
    files = tuple(_parse_file(item, where) for item in raw.get("files", []))
    if not files and not raw.get("snapshot"):
        raise ModelError(f"{where}: list its 'files' (or set \"snapshot\": true for a whole repo).")
    return ModelEntry(
        name=name,
        family=str(raw["family"]),
        files=files,
        title=str(raw.get("title", name)),
        format=str(raw.get("format") or implied_format(files, raw.get("backends", ()))),
        repo=str(repo) if repo else None,
        revision=revision,
        local_path=local_path,
        backends=tuple(raw.get("backends", ())),
        convert=raw.get("convert"),
        snapshot=bool(raw.get("snapshot", False)),
        license=raw.get("license"),
        min_ram_gb=raw.get("min_ram_gb"),
        min_vram_gb=raw.get("min_vram_gb"),
        card=raw.get("card"),
        origin=origin,
    )


def read_catalog_file(path: PathLike, origin: Optional[str] = None) -> list[ModelEntry]:
    """Entries of one catalog file; ModelError with the file name when it cannot be used."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"Catalog file {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"Catalog file {path} is not readable JSON ({exc}); fix or remove it.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ModelError(f"Catalog file {path} must be an object with a 'models' list.")
    return [parse_entry(item, origin or str(path), path.parent) for item in data["models"]]


def load_catalog(
    user_catalog: Optional[PathLike] = None,
    include_user: bool = True,
    builtin: PathLike = BUILTIN_CATALOG,
) -> Catalog:
    """The built-in catalog merged with the user catalog (when it exists)."""
    entries = read_catalog_file(builtin, origin="builtin")
    if include_user:
        user_path = Path(user_catalog) if user_catalog else default_user_catalog()
        if user_path.exists():
            entries += read_catalog_file(user_path)
    return Catalog(entries)


def add_user_entry(raw: Mapping[str, Any], user_catalog: Optional[PathLike] = None) -> Path:
    """Validate ``raw`` and add it to (or replace it in) the user catalog file, atomically."""
    path = Path(user_catalog) if user_catalog else default_user_catalog()
    entry = parse_entry(raw, str(path), path.parent)
    if entry.format and not raw.get("format"):
        raw = {**raw, "format": entry.format}  # recorded: what `models get` decides by
    data: dict[str, Any] = {"models": []}
    if path.exists():
        read_catalog_file(path)  # refuse to extend a broken file
        data = json.loads(path.read_text(encoding="utf-8"))
    data["models"] = [m for m in data["models"] if m.get("name") != raw["name"]] + [dict(raw)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".catalog-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)
    return path
