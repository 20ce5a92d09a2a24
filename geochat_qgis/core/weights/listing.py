"""The model list the dock shows: every catalog model, what getting it takes, what runs it here.

``model_list`` asks no server (catalog sizes, the caches on disk, installed packages and GPUs),
so the dock can call it through the runtime whenever it opens.
"""
from __future__ import annotations

from typing import Any, Optional

from ..errors import GeoChatError
from .catalog import Catalog, PathLike, load_catalog
from .get_plan import plan_get
from .store import model_status


def _status(choices: list[dict[str, Any]], downloaded: str) -> str:
    if any(c["installed"] for c in choices):
        return "ready"
    return {"installed": "downloaded", "partial": "partial"}.get(downloaded, "missing")


def model_list(cache: Optional[PathLike] = None, catalog: Optional[Catalog] = None) -> list[dict[str, Any]]:
    """One row per catalog model: name, title, family, licence, status (ready | downloaded |
    partial | missing), download bytes, and its choices (target, quant, bytes, backends that run
    it on this machine, the others with why not, the installed folder)."""
    catalog = catalog or load_catalog()
    rows = []
    for entry in catalog:
        row: dict[str, Any] = {
            "name": entry.name, "title": entry.title, "family": entry.family,
            "license": entry.license, "needs_conversion": bool(entry.convert),
            "requires": list((entry.convert or {}).get("requires", [])),
            "backends_published": list(entry.backends), "local": entry.is_local,
        }
        if entry.is_local:
            row.update(status="ready", download_bytes=0, choices=[], folder=str(entry.local_path))
            rows.append(row)
            continue
        try:
            plan = plan_get(entry.name, cache=cache, catalog=catalog, online=False)
        except GeoChatError as exc:
            row.update(status="unavailable", message=str(exc), choices=[], download_bytes=0)
            rows.append(row)
            continue
        choices = [{"target": c.target, "quant": c.quant, "bytes": c.bytes,
                    "temp_bytes": c.temp_bytes, "backends": list(c.backends),
                    "not_here": c.not_here, "installed": c.installed} for c in plan.choices]
        row.update(status=_status(choices, model_status(entry, cache)),
                   download_bytes=sum(s.total_bytes for s in plan.sources),
                   memory_needed=plan.memory_needed, choices=choices)
        rows.append(row)
    return rows
