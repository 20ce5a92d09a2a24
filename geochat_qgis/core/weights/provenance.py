"""Where a model's weights came from, recorded with the model and copied onto every result.

``provenance.json`` in a model folder (written by ``get_model`` before the folder appears)
holds the source repositories, revisions and commits, every source file's sha256, the converter
and its version, the target and quantisation, and the sha256 of every output file.
``provenance_attributes(model_path)`` turns it into the short text attributes a result feature
carries (:data:`PROVENANCE_FIELDS`); a model fetched without conversion (a catalog GGUF) gets
the same attributes from its download manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

PROVENANCE_FILE = "provenance.json"
# Result attribute names (10 characters at most: they also fit a shapefile's dBase fields).
PROVENANCE_FIELDS = ("model_src", "model_rev", "model_hash", "converter", "quant")
_QUANT_IN_NAME = re.compile(r"(?i)(?:^|[-_.])(q\d_k_[sml]|q\d_k|q\d_\d|iq\d_\w+|f16|bf16|f32)(?=\.gguf$)")


def write_provenance(folder: Path, data: Mapping[str, Any]) -> Path:
    """Write ``folder/provenance.json`` atomically."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".provenance-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(dict(data), handle, indent=2)
    target = Path(folder) / PROVENANCE_FILE
    os.replace(tmp, target)
    return target


def _model_folder(model_path: Union[str, os.PathLike]) -> Path:
    path = Path(model_path)
    return path if path.is_dir() else path.parent


def read_provenance(model_path: Union[str, os.PathLike]) -> Optional[dict]:
    """The provenance recorded for the model at ``model_path`` (a folder or a file in it)."""
    try:
        data = json.loads((_model_folder(model_path) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def combined_hash(hashes: Mapping[str, str]) -> str:
    """One sha256 for several files: of the sorted ``"<sha256>  <name>"`` lines (sha256sum's
    format), so ``sha256sum * | sort -k2 | sha256sum`` checks it. A single file: its own hash."""
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _from_provenance(data: Mapping[str, Any]) -> dict[str, str]:
    primary = data.get("source") or [{}]
    first = primary[0] if isinstance(primary, list) and primary else {}
    converter = data.get("converter") or {}
    converter_text = " ".join(str(converter[k]) for k in ("name", "version") if converter.get(k))
    return {
        "model_src": str(first.get("repo") or data.get("model_id") or ""),
        "model_rev": str(first.get("commit") or first.get("revision") or ""),
        "model_hash": str(data.get("model_hash") or ""),
        "converter": converter_text,
        "quant": str(data.get("quant") or data.get("dtype") or ""),
    }


def _from_manifest(folder: Path, model_file: Optional[Path]) -> dict[str, str]:
    try:
        data = json.loads((folder / ".geochat-manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") or {}
    if model_file is not None and model_file.name in files:
        hashes = {model_file.name: files[model_file.name].get("sha256", "")}
    else:
        hashes = {name: info.get("sha256", "") for name, info in files.items()}
    match = _QUANT_IN_NAME.search(model_file.name) if model_file is not None else None
    return {
        "model_src": str(data.get("repo") or data.get("name") or ""),
        "model_rev": str(data.get("commit") or data.get("revision") or ""),
        "model_hash": combined_hash(hashes) if hashes and all(hashes.values()) else "",
        "converter": "",
        "quant": match.group(1).lower() if match else "",
    }


def provenance_attributes(model_path: Union[str, os.PathLike, None]) -> dict[str, str]:
    """The :data:`PROVENANCE_FIELDS` values for the model at ``model_path`` (a model folder or
    its main file); {} when nothing is recorded there (a model the user built by hand)."""
    if not model_path:
        return {}
    path = Path(model_path)
    data = read_provenance(path)
    if data is not None:
        return _from_provenance(data)
    return _from_manifest(_model_folder(path), path if path.is_file() else None)
