"""The runtime's other requests: status, model status, export a result file, get a model."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Any, Optional

from ...__about__ import version
from ..deps.gpu import nvidia_gpus
from ..deps.pip import probe_imports
from ..errors import ExportError, GeoChatError
from ..export import DRIVERS, PROVENANCE, export_detections
from ..jobs import backend_spec
from ..results import Detection
from ..vision.selftest import qwen_note
from ..weights.get import get_model as get
from ..weights.proxy import apply_proxy
from .job_ops import Context

PACKAGES = ("numpy", "shapely", "pyproj", "rasterio", "pyogrio", "pillow", "gguf",
            "llama-cpp-python", "torch", "transformers")
BACKEND_MODULES = {"llama.cpp": ("llama_cpp",), "transformers": ("torch", "transformers"),
                   "geopixel": ("torch", "transformers"), "openai": ()}


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_modules(kind: str) -> list[str]:
    """The backend's modules this runtime cannot import (found without importing them)."""
    return [m for m in BACKEND_MODULES.get(kind, ()) if importlib.util.find_spec(m) is None]


def _imports(kind: str) -> Optional[str]:
    """None when the backend's modules import in a fresh process, else the first error."""
    failed = [c for c in probe_imports(sys.executable, BACKEND_MODULES[kind]) if not c.ok]
    return f"{failed[0].module}: {failed[0].error}" if failed else None


def status(loaded: Optional[str], deep: bool = False) -> dict[str, Any]:
    """Versions, which backends can import (``deep``: really imported, in a fresh process,
    with the errors), the GPUs nvidia-smi reports, the loaded model."""
    found = {kind: not missing_modules(kind) for kind in BACKEND_MODULES}
    errors = {kind: _imports(kind) for kind, modules in BACKEND_MODULES.items()
              if found[kind] and modules} if deep else {}
    return {
        "geochat": version(), "python": sys.executable,
        "python_version": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "backends": {kind: ok and not errors.get(kind) for kind, ok in found.items()},
        "import_errors": {kind: error for kind, error in errors.items() if error},
        "gpus": [{"name": g.name, "memory_mb": g.memory_mb, "driver": g.driver}
                 for g in nvidia_gpus()],
        "loaded": loaded,
    }


def model_status(request: dict[str, Any], loaded_spec: Any) -> dict[str, Any]:
    """Whether the request's model can run here: resolved, files present, packages there."""
    try:
        spec = backend_spec(request)
    except GeoChatError as exc:
        return {"ready": False, "message": str(exc), "loaded": False, "missing": []}
    missing = missing_modules(spec.kind)
    message = (f"the {spec.kind} backend's packages are missing ({', '.join(missing)}): install "
               "them with Raster > GeoChat > Install model dependencies..." if missing
               else f"{Path(spec.model).name} ({spec.kind}, {spec.family}) is ready")
    if not missing and spec.kind == "llama.cpp" and spec.family == "qwen2.5-vl":
        note = qwen_note()  # libmtmd's Qwen self-test, when it failed
        message += f"; {note}" if note else ""
    return {"ready": not missing, "message": message, "kind": spec.kind, "family": spec.family,
            "model": spec.model, "loaded": spec == loaded_spec, "missing": missing}


def read_detections(source: str, layer: Optional[str]) -> tuple[list[Detection], Optional[str]]:
    """The features of a result layer as Detections (their attributes kept), and its CRS."""
    import pyogrio
    import shapely

    try:
        meta, _, geometry, columns = pyogrio.raw.read(source, layer=layer)
    except Exception as exc:  # pyogrio's DataSourceError and friends
        raise ExportError(f"cannot read {source}{f' layer {layer}' if layer else ''} ({exc}): "
                          "choose a GeoChat result layer") from exc
    names = list(meta["fields"])
    rows = [dict(zip(names, values)) for values in zip(*columns)] if names else \
        [{} for _ in range(len(geometry))]
    detections = []
    for wkb, row in zip(geometry, rows):
        if wkb is None:
            continue
        flags = [f for f in str(row.get("flags") or "").split(",") if f]
        number = (lambda v: None if v is None or v != v else float(v))  # noqa: E731 (NaN: null)
        detections.append(Detection(
            label=str(row.get("label") or ""), geometry=shapely.from_wkb(wkb),
            kind=str(row.get("kind") or "box"), phrase=str(row.get("phrase") or ""),
            angle=number(row.get("angle")), score=number(row.get("score")), flags=flags,
            tile_id=str(row.get("tile_id") or ""), frame="crs", crs=meta.get("crs"),
            attributes={k: row[k] for k in PROVENANCE if row.get(k) is not None}))
    return detections, meta.get("crs")


def export(message: dict[str, Any]) -> dict[str, Any]:
    """Copy a result layer to ``destination`` with the core's writer (schema, atomic)."""
    destination = Path(message["destination"]).expanduser()
    driver = message.get("driver")
    if driver and DRIVERS.get(destination.suffix.lower()) != driver:
        suffix = {v: k for k, v in DRIVERS.items() if k != ".json"}.get(driver)
        if suffix is None:
            raise ExportError(f"unknown format {driver}: choose ESRI Shapefile, GPKG or GeoJSON")
        destination = destination.with_suffix(suffix)
    detections, crs = read_detections(message["source"], message.get("layer"))
    into = message.get("destination_layer") if DRIVERS.get(destination.suffix.lower()) == "GPKG" \
        else None  # a named layer of a GeoPackage (its other layers kept)
    written = export_detections(detections, destination, crs, into or None)
    return {"output": str(written), "features": len(detections)}


def get_model(message: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Download (and convert) a catalog model with core/weights' get_model, streaming
    ``{"type": "get_model", "phase", "done", "total", "rate", "eta"}`` events. Options:
    target (gguf | hf), quant, cache_dir, endpoint, hf_cache, ignore_memory, proxy (QGIS's
    proxy settings: weights/proxy.py's apply_proxy)."""
    options = message.get("options") or {}
    name = str(message["model"])
    apply_proxy(options)  # QGIS's proxy settings, sent by the dock

    def progress(phase: str, done: int, total: Optional[int], rate: Optional[float],
                 eta: Optional[float]) -> None:
        ctx.event({"type": "get_model", "phase": phase, "done": done, "total": total,
                   "rate": rate, "eta": eta})

    model = get(name, options.get("target"), options.get("quant"),
                options.get("cache_dir") or None, progress, ctx.cancel,
                endpoint=options.get("endpoint") or None, hf_cache=options.get("hf_cache"),
                ignore_memory=bool(options.get("ignore_memory", False)))
    return {"model": model.model_id, "target": model.target, "quant": model.quant,
            "folder": str(model.folder), "model_path": str(model.model_path),
            "mmproj_path": str(model.mmproj_path) if model.mmproj_path else None,
            "backends": list(model.backends), "message": f"{name} is ready in {model.folder}"}

