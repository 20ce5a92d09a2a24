"""The runtime's model requests for the dock: the model list, the get plan, deleting sources,
checking a model (a server is asked for its models).

Each takes the request message and returns plain JSON data; the dock (QGIS's process) never
imports core/weights itself.
"""
from __future__ import annotations

from typing import Any, Optional

from ..backends.factory import create_backend
from ..errors import GeoChatError
from ..jobs import backend_spec
from ..weights.demo import DEMO_GEOPIXEL_NAME, DEMO_GEOPIXEL_NOTE, DEMO_GEOPIXEL_TITLE, DEMO_NAME, DEMO_NOTE
from ..weights.get_plan import plan_get as plan
from ..weights.installed import delete_sources as delete, source_cleanup
from ..weights.listing import model_list as listing
from ..weights.machine import backends_here
from ..weights.proxy import apply_proxy
from .info_ops import model_status

DEMO_TITLE = "Tiny demo model (random answers)"


def _cache(message: dict[str, Any]) -> Optional[str]:
    return (message.get("cache_dir") or (message.get("options") or {}).get("cache_dir")) or None


def model_list(message: dict[str, Any], ctx: Any = None) -> dict[str, Any]:
    """``{"models": [row...]}``: the demo model, then every catalog model with its status,
    downloads, converted size per choice, memory needed and the backends that run it here
    (core/weights/listing.py; no server is asked)."""
    demo = {"name": DEMO_NAME, "title": DEMO_TITLE, "family": "geochat", "status": "ready",
            "needs_conversion": False, "requires": [], "download_bytes": 0, "choices": [],
            "backends_published": ["llama.cpp"], "message": DEMO_NOTE}
    why = backends_here()["geopixel"]  # built on first use; needs the geopixel backend (torch)
    geopixel = {**demo, "name": DEMO_GEOPIXEL_NAME, "title": DEMO_GEOPIXEL_TITLE,
                "family": "geopixel", "backends_published": ["geopixel"],
                "message": DEMO_GEOPIXEL_NOTE,
                "choices": [{"target": "download", "quant": None, "bytes": 0, "temp_bytes": 0,
                             "backends": [] if why else ["geopixel"],
                             "not_here": {"geopixel": why} if why else {}, "installed": None}]}
    return {"models": [demo, geopixel, *listing(_cache(message))]}


def plan_get(message: dict[str, Any], ctx: Any = None) -> dict[str, Any]:
    """The get plan of ``message["model"]`` (options: target, quant, cache_dir, endpoint,
    hf_cache, ignore_memory): sources, sizes, disk and memory against what is free, and the
    ``problems`` that would refuse it (``ok`` False) before any byte is fetched."""
    options = message.get("options") or {}
    apply_proxy(options)
    result = plan(str(message["model"]), options.get("target"), options.get("quant"),
                  _cache(message), endpoint=options.get("endpoint") or None,
                  hf_cache=options.get("hf_cache"),
                  ignore_memory=bool(options.get("ignore_memory", False)))
    data = result.to_dict()
    data["message"] = (" ".join(result.problems) if result.problems else
                       f"{result.model_id}: {result.download_bytes / 1e9:.2f} GB to download, "
                       f"{result.disk_needed / 1e9:.2f} GB of disk needed, "
                       f"{result.disk_free / 1e9:.2f} GB free")
    return data


def delete_sources(message: dict[str, Any], ctx: Any = None) -> dict[str, Any]:
    """Delete a converted model's original downloads (``dry_run``: only say what it would
    free): ``{"folders", "bytes", "deleted"}``."""
    name, cache = str(message["model"]), _cache(message)
    offer = source_cleanup(name, cache)
    folders = [str(f) for f in offer.folders]
    if message.get("dry_run"):
        return {"folders": folders, "bytes": offer.bytes, "deleted": False}
    return {"folders": folders, "bytes": delete(name, cache), "deleted": True}


def check_model(message: dict[str, Any], ctx: Any = None) -> dict[str, Any]:
    """Whether the request's model answers: a server is asked for its models (refused,
    timeout, 401, 404 each a clear message); a local model as ``model_status`` says."""
    request = message["request"]
    try:
        spec = backend_spec(request)
    except GeoChatError as exc:
        return {"ready": False, "message": str(exc)}
    if spec.kind != "openai":
        return model_status(request, None)
    backend = create_backend(spec)
    try:
        backend.load()  # GET /models
    except GeoChatError as exc:
        return {"ready": False, "message": str(exc)}
    finally:
        backend.close()
    return {"ready": True, "message": f"{spec.settings.get('base_url')} serves '{spec.model}'"}
