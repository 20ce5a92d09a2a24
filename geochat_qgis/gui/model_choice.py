"""Which model the dock runs: the choices it lists, their status, and the request's ``model``.

Standard library and the runtime client only (nothing of the core is imported in QGIS's
process). The list comes from the runtime's ``model_list`` (:func:`fetch_rows`, a worker
thread: it may start the child) and, before a runtime exists, from ``models/catalog.json``
read with json (:func:`catalog_rows`). No widgets here: the dock shows what these return.

For the dock::

    rows = fetch_rows(client, cache_dir)         # worker thread; remembered for model_status
    model_choices(rows) -> [ModelChoice]         # the combo's items (demo first)
    model_status(key, settings) -> (status, sentence)   # instant, from the remembered rows
    model_request(key, settings, api_key) -> dict       # a request's "model" part
    check_server(client, key, settings, api_key) -> (status, sentence)   # worker thread
    describe_getting(row) -> str                 # what getting a model takes, one paragraph
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..__about__ import MODELS_DIR
from ..client import RuntimeClientError

READY, MISSING, NEEDS_GPU, SERVER, NOT_FOUND = "ready", "not downloaded", "needs a GPU", "server", "not found"
UNREACHABLE, CHECKING, NO_BACKEND = "server unreachable", "checking", "cannot run here"
DEMO_NAME = "tiny-demo"  # core/weights/demo.py's name (a unit test keeps the two equal)
DEMO_NOTE = "tiny demo model with random weights: its answers are random, not real findings"
DEMO_TITLE = "Tiny demo model (random answers)"
# core/weights/demo.py's GeoPixel demo (the same unit test keeps them equal)
DEMO_GEOPIXEL_NAME = "tiny-geopixel-demo"
DEMO_GEOPIXEL_TITLE = "Tiny GeoPixel demo (random masks)"
DEMO_GEOPIXEL_NOTE = ("tiny GeoPixel demo with random weights (geopixel backend, CPU): its masks "
                      "are random, not real findings")
DEMOS = (DEMO_NAME, DEMO_GEOPIXEL_NAME)
GB = 1e9

_ROWS: dict[str, dict[str, Any]] = {}  # the last model_list rows, by name
_ROWS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelChoice:
    key: str  # DEMO_NAME, a catalog name, or a path
    title: str
    family: str = "geochat"
    catalog: bool = False
    needs_get: bool = False  # got with the Get dialog (download and convert)
    note: str = ""  # what runs it on this machine, what getting it takes (the item's tooltip)


# ------------------------------------------------------------------ the list
def _user_catalog() -> Path:
    """Where the core reads the user's catalog (core/weights/catalog.py: default_user_catalog)."""
    if os.environ.get("GEOCHAT_USER_CATALOG"):
        return Path(os.environ["GEOCHAT_USER_CATALOG"]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "geochat-qgis" / "catalog.json"


def _read_models(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # a broken user catalog must not break the dock; the CLI reports it
    models = data.get("models") if isinstance(data, dict) else None
    return [m for m in models or [] if isinstance(m, dict) and m.get("name")]


def catalog_rows() -> list[dict[str, Any]]:
    """The catalog as the runtime's model_list would list it, from the JSON files alone
    (status ``unknown``: only the runtime looks at the caches)."""
    by_name: dict[str, dict[str, Any]] = {}
    for path in (MODELS_DIR / "catalog.json", _user_catalog()):
        for raw in _read_models(path):
            files = raw.get("files") or []
            by_name[str(raw["name"])] = {
                "name": str(raw["name"]), "title": str(raw.get("title") or raw["name"]),
                "family": str(raw.get("family") or "geochat"),
                "status": "ready" if raw.get("path") else "unknown",
                "needs_conversion": bool(raw.get("convert")),
                "requires": list((raw.get("convert") or {}).get("requires") or []),
                "backends_published": list(raw.get("backends") or []),
                "download_bytes": sum(int(f.get("size") or f.get("approx_size") or 0)
                                      for f in files if isinstance(f, dict)),
                "choices": [], "local": bool(raw.get("path")),
            }
    own = {name: row["download_bytes"] for name, row in by_name.items()}
    for row in by_name.values():  # what its conversion needs is downloaded too
        row["download_bytes"] += sum(own.get(name, 0) for name in row["requires"])
    return list(by_name.values())


def fetch_rows(client: Any, cache_dir: str = "") -> list[dict[str, Any]]:
    """The runtime's model list (worker thread: may start the child); remembered for
    :func:`model_status`. Falls back to :func:`catalog_rows` when no runtime answers (their
    status ``unknown`` shows as not downloaded)."""
    try:
        rows = client.model_list(cache_dir or None)
    except RuntimeClientError:
        rows = catalog_rows()  # remembered too: the dock does not ask again and again
    remember_rows(rows)
    return rows


def remember_rows(rows: list[dict[str, Any]]) -> None:
    with _ROWS_LOCK:
        _ROWS.clear()
        _ROWS.update({str(r.get("name")): dict(r) for r in rows})


def remembered(name: str) -> Optional[dict[str, Any]]:
    with _ROWS_LOCK:
        row = _ROWS.get(name)
        return dict(row) if row is not None else None


def _listed(row: dict[str, Any]) -> bool:
    """Runs as published, converts into something that runs, or is the user's own folder."""
    return bool(row.get("backends_published") or row.get("needs_conversion") or row.get("local")
                or any(c.get("backends") or c.get("not_here") for c in row.get("choices") or []
                       if c.get("target") == "download"))


def model_choices(rows: Optional[list[dict[str, Any]]] = None) -> list[ModelChoice]:
    """The demo model, then every catalog model that runs as published or can be got."""
    if rows is None:
        with _ROWS_LOCK:
            rows = list(_ROWS.values()) or None
    choices = [ModelChoice(DEMO_NAME, DEMO_TITLE, note=DEMO_NOTE),
               ModelChoice(DEMO_GEOPIXEL_NAME, DEMO_GEOPIXEL_TITLE, "geopixel",
                           note=DEMO_GEOPIXEL_NOTE)]
    for row in rows if rows is not None else catalog_rows():
        if row.get("name") in DEMOS or row.get("family") == "clip" or not _listed(row):
            continue
        title = str(row.get("title") or row["name"])
        choices.append(ModelChoice(str(row["name"]), title, str(row.get("family") or "geochat"),
                                   True, bool(row.get("needs_conversion")), _note(row)))
    return choices


# ------------------------------------------------------------------ status
def _size(n: Optional[float]) -> str:
    return f"{(n or 0) / GB:.1f} GB"


def describe_getting(row: dict[str, Any]) -> str:
    """What getting the model takes: downloads, converted sizes per choice, disk and memory."""
    parts = []
    if row.get("download_bytes"):
        needs = ", ".join(row.get("requires") or [])
        parts.append(f"download {_size(row['download_bytes'])}" + (f" (with {needs})" if needs else ""))
    sizes = [f"{c['target']}{' ' + c['quant'] if c.get('quant') else ''} {_size(c.get('bytes'))}"
             for c in row.get("choices") or [] if c.get("target") != "download"]
    if sizes:
        parts.append("converted: " + ", ".join(sizes))
    if row.get("memory_needed"):
        parts.append(f"converting needs about {_size(row['memory_needed'])} of memory")
    return "; ".join(parts)


def _note(row: dict[str, Any]) -> str:
    if row.get("choices"):
        runs = _runs_here(row)
        text = f"runs here with {', '.join(runs)}" if runs else f"does not run here ({_why_not(row)})"
    else:  # the catalog's own list: what runs it, not yet checked on this machine
        text = f"runs with {', '.join(row.get('backends_published') or [])}" if row.get(
            "backends_published") else ""
    what = "" if row.get("status") == "ready" else describe_getting(row)
    return "; ".join(p for p in (text, f"getting it: {what}" if what else "") if p)


def _runs_here(row: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for choice in row.get("choices") or []:
        found += [b for b in choice.get("backends") or [] if b not in found]
    return found


def model_status(choice_key: str, settings: Any, row: Optional[dict[str, Any]] = None) -> tuple[str, str]:
    """(status, sentence) for the dock, at once (no child): from ``row`` or the remembered
    model_list rows; a catalog model not listed yet is ``checking``."""
    if backend_for(choice_key, settings) == "openai":
        return SERVER, f"served by {settings.server_url} as '{settings.server_model or choice_key}'"
    if choice_key == DEMO_NAME:
        return READY, DEMO_NOTE
    row = row or remembered(choice_key)
    if choice_key == DEMO_GEOPIXEL_NAME:  # built on first use; the runtime says what runs it
        return (NO_BACKEND, _why_not(row)) if row and not _runs_here(row) and row.get(
            "choices") else (READY, DEMO_GEOPIXEL_NOTE)
    if row is None:
        if choice_key and Path(choice_key).expanduser().exists():
            return READY, f"local model {Path(choice_key).name}"
        with _ROWS_LOCK:
            listed = bool(_ROWS)  # listed already without it: asking again would not help
        if choice_key in {r["name"] for r in catalog_rows()} and not listed:
            return CHECKING, "looking for it in the model cache..."
        return NOT_FOUND, f"'{choice_key}' is neither a file nor a catalog model"
    title = row.get("title") or row.get("name")
    if row.get("status") == "unavailable":
        return NOT_FOUND, str(row.get("message") or f"{title} cannot be listed")
    runs = _runs_here(row)
    if row.get("status") == "ready":
        if not runs and row.get("choices"):
            return NO_BACKEND, _why_not(row)
        return READY, f"{title} is ready" + (f" ({', '.join(runs)})" if runs else "")
    if not runs and row.get("choices"):
        return NO_BACKEND, _why_not(row)
    what = describe_getting(row)
    verb = "got (downloaded and converted)" if row.get("needs_conversion") else "downloaded"
    return MISSING, f"{title} is not {verb} yet" + (f": {what}" if what else "")


def _why_not(row: dict[str, Any]) -> str:
    reasons = {b: why for c in row.get("choices") or [] for b, why in (c.get("not_here") or {}).items()}
    return "; ".join(f"{b}: {why}" for b, why in reasons.items()) or "no backend here runs it"


# ------------------------------------------------------------------ the request
def is_geopixel(choice_key: str) -> bool:
    """Whether the choice is a GeoPixel model (the demo, a catalog entry, or a folder whose
    config.json names InternLM-XComposer / GeoPixel): the geopixel backend runs it."""
    if choice_key == DEMO_GEOPIXEL_NAME:
        return True
    row = remembered(choice_key) or next((r for r in catalog_rows() if r["name"] == choice_key), None)
    if row is not None:
        return row.get("family") == "geopixel"
    config = Path(choice_key).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError):
        return False
    names = " ".join([str(data.get("model_type", ""))] + [str(a) for a in data.get(
        "architectures") or []]) if isinstance(data, dict) else ""
    return "geopixel" in names.lower() or "xcomposer" in names.lower()


def backend_for(choice_key: str, settings: Any) -> str:
    """The backend that runs the choice: geopixel for GeoPixel models (no server serves them),
    else the dock's."""
    return "geopixel" if is_geopixel(choice_key) else settings.backend


def model_request(choice_key: str, settings: Any, api_key: Optional[str] = None) -> dict[str, Any]:
    """The ``model`` part of a runtime request for the dock's choice and the plugin settings
    (resolved by core/jobs.py in the child)."""
    cache = getattr(settings, "cache_dir", "") or None
    if backend_for(choice_key, settings) == "openai":
        model: dict[str, Any] = {"backend": "openai", "server_url": settings.server_url,
                                 "server_model": settings.server_model or choice_key,
                                 "name": choice_key or None}
        if api_key:
            model["api_key"] = api_key
        return model
    model = {"backend": backend_for(choice_key, settings) or None, "cache_dir": cache}
    if choice_key in DEMOS:
        model.update(name=choice_key, backend="llama.cpp" if choice_key == DEMO_NAME else "geopixel")
    elif choice_key and (Path(choice_key).expanduser().exists() or os.sep in choice_key):
        model["model_path"] = str(Path(choice_key).expanduser())
        if getattr(settings, "mmproj", ""):
            model["mmproj_path"] = settings.mmproj
    else:
        model["name"] = choice_key
    if model["backend"] == "llama.cpp":
        if settings.threads > 0:
            model["n_threads"] = settings.threads
        if settings.gpu_layers >= 0:
            model["n_gpu_layers"] = settings.gpu_layers
    elif settings.device != "auto":
        model["device"] = settings.device
    return {k: v for k, v in model.items() if v is not None}


def check_server(client: Any, choice_key: str, settings: Any,
                 api_key: Optional[str] = None) -> tuple[str, str]:
    """(status, sentence) after the runtime asked the server for its models (worker thread)."""
    try:
        reply = client.check_model({"model": model_request(choice_key, settings, api_key)})
    except RuntimeClientError as exc:
        return UNREACHABLE, exc.message
    return (READY if reply.get("ready") else UNREACHABLE), str(reply.get("message") or "")
