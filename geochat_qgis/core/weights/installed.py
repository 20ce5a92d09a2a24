"""Models already got: where they are, what runs them, and removing what is no longer needed.

``installed_model`` finds a converted copy (its folder holds ``provenance.json``) or a complete
download; ``source_cleanup`` / ``delete_sources`` are the offer, once a model is converted, to
delete its original checkpoint (links into the Hugging Face cache and the user's own folders are
never deleted); ``remove_converted`` deletes one converted copy.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ModelError
from .catalog import Catalog, PathLike, load_catalog
from .get_plan import QUANTS, check_choice, converted_dir, is_installed
from .gguf_writer import MMPROJ_GGUF, TEXT_GGUF
from .locks import exclusive
from .machine import runnable_backends
from .provenance import provenance_attributes, read_provenance
from .store import model_status


@dataclass(frozen=True)
class InstalledModel:
    """A model ready to run: where it is, what runs it, where it came from."""

    model_id: str
    target: str  # gguf | hf | download
    quant: Optional[str]
    folder: Path
    model_path: Path  # what a job's model_path takes: the GGUF file, or the folder
    mmproj_path: Optional[Path]
    backends: tuple[str, ...]
    provenance: dict = field(default_factory=dict)
    source_folders: tuple[Path, ...] = ()  # the downloads it was made from (deletable)

    def request_model(self, backend: Optional[str] = None) -> dict[str, Any]:
        """The ``model`` part of a job request that runs this model."""
        return {"name": self.model_id, "backend": backend or (self.backends or ("",))[0] or None,
                "model_path": str(self.model_path),
                "mmproj_path": str(self.mmproj_path) if self.mmproj_path else None}

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "target": self.target, "quant": self.quant,
                "folder": str(self.folder), "model_path": str(self.model_path),
                "mmproj_path": str(self.mmproj_path) if self.mmproj_path else None,
                "backends": list(self.backends), "provenance": self.provenance,
                "source_folders": [str(p) for p in self.source_folders]}


def installed_model(model_id: str, target: Optional[str] = None, quant: Optional[str] = None,
                    cache: Optional[PathLike] = None, catalog: Optional[Catalog] = None,
                    backends: Optional[tuple[str, ...]] = None) -> Optional[InstalledModel]:
    """The model already got with that choice, or None (``backends``: those that run it here,
    found when not given)."""
    catalog = catalog or load_catalog()
    entry = catalog.get(model_id)
    target, quant = check_choice(entry, target, quant)
    if backends is None:
        fmt = target if target != "download" else ("gguf" if entry.format == "gguf" else entry.format)
        backends = tuple(runnable_backends(fmt)[0])
    needs = [catalog.get(n) for n in (entry.convert or {}).get("requires", [])]
    sources = tuple(e.local_dir(cache) for e in [entry, *needs])
    if target == "download":
        if model_status(entry, cache) != "installed":
            return None
        folder = entry.local_dir(cache)
        model = folder / entry.file("model").path if any(f.role == "model" for f in entry.files) else folder
        mmproj = folder / entry.file("mmproj").path if any(f.role == "mmproj" for f in entry.files) else None
        return InstalledModel(entry.name, target, None, folder, model, mmproj, backends,
                              provenance_attributes(model), ())
    folder = converted_dir(entry, target, quant, cache)
    if not is_installed(folder):
        return None

    gguf = target == "gguf"
    return InstalledModel(entry.name, target, quant, folder, folder / TEXT_GGUF if gguf else folder,
                          folder / MMPROJ_GGUF if gguf else None, backends,
                          read_provenance(folder) or {}, tuple(p for p in sources if p.exists()))


def find_installed(model_id: str, backend: Optional[str] = None, cache: Optional[PathLike] = None,
                   catalog: Optional[Catalog] = None) -> Optional[InstalledModel]:
    """The default choice of ``model_id`` when got, else any other converted copy that
    ``backend`` loads (llama.cpp: a GGUF, q4_k_m first; transformers: the HF checkpoint)."""
    catalog = catalog or load_catalog()
    entry = catalog.get(model_id)
    if not entry.convert:
        return installed_model(model_id, None, None, cache, catalog)
    targets = tuple(entry.convert.get("to") or ("hf", "gguf"))
    order = [("gguf", q) for q in QUANTS if "gguf" in targets and backend in (None, "llama.cpp")]
    order += [("hf", None)] if "hf" in targets and backend in (None, "transformers") else []
    order += [("safetensors", None)] if "safetensors" in targets and backend in (None, "geopixel") else []
    for target, quant in order:
        found = installed_model(model_id, target, quant, cache, catalog)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class SourceCleanup:
    """What deleting a converted model's original downloads would free."""

    folders: tuple[Path, ...]
    bytes: int  # linked files (Hugging Face cache) free nothing and are not counted


def _own_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and not p.is_symlink() and p.stat().st_nlink == 1)


def source_cleanup(model_id: str, cache: Optional[PathLike] = None,
                   catalog: Optional[Catalog] = None) -> SourceCleanup:
    """The offer to make once a model is converted: its downloads and what deleting them frees."""
    catalog = catalog or load_catalog()
    entry = catalog.get(model_id)
    if not entry.convert:
        return SourceCleanup((), 0)
    names = [entry.name, *(entry.convert.get("requires") or [])]
    own = [catalog.get(n) for n in names]
    # the user's own folders (a local catalog entry) are never offered for deletion
    folders = tuple(e.local_dir(cache) for e in own
                    if not e.is_local and e.local_dir(cache).is_dir())
    return SourceCleanup(folders, sum(_own_bytes(f) for f in folders))


def delete_sources(model_id: str, cache: Optional[PathLike] = None,
                   catalog: Optional[Catalog] = None) -> int:
    """Delete the original downloads of a converted model (the converted one keeps working);
    returns the bytes freed. Refused while no converted copy of it is installed."""
    catalog = catalog or load_catalog()
    entry = catalog.get(model_id)
    if not entry.convert:
        raise ModelError(f"Model '{model_id}' is used as downloaded; remove it with "
                         f"`models remove {model_id}`.")
    root = converted_dir(entry, "hf", None, cache).parent
    if not (root.is_dir() and any(is_installed(p) for p in root.iterdir())):
        raise ModelError(f"No converted copy of '{model_id}' is installed yet; deleting its "
                         "downloads would leave nothing to run. Get it first.")
    offer = source_cleanup(model_id, cache, catalog)
    for folder in offer.folders:
        shutil.rmtree(folder)
    return offer.bytes


def remove_converted(model_id: str, target: Optional[str] = None, quant: Optional[str] = None,
                     cache: Optional[PathLike] = None, catalog: Optional[Catalog] = None) -> int:
    """Delete one converted copy of ``model_id`` (its downloads stay); returns bytes freed."""
    catalog = catalog or load_catalog()
    entry = catalog.get(model_id)
    if not entry.convert:
        raise ModelError(f"Model '{model_id}' is used as downloaded; remove it with "
                         f"`models remove {model_id}`.")
    target, quant = check_choice(entry, target, quant)
    folder = converted_dir(entry, target, quant, cache)
    if not folder.exists():
        return 0
    with exclusive(folder):
        freed = _own_bytes(folder)
        shutil.rmtree(folder)
    return freed
