"""From the user's choices (a plain JSON request) to a Job or a ChatRequest: the ONE place.

The CLI, the runtime server (the dock and Processing through the client) all call
:func:`build_job` / :func:`build_chat`, so the family's tile size and pad colour, the GSD, the
overlap, the overview rule for questions and the backend spec are resolved once, the same way.
The request's keys are listed in ``geochat_qgis/client/__init__.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any, Mapping, Optional

from shapely import wkt as shapely_wkt
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from .backends.factory import BACKEND_CLASSES, BackendSpec, normalise_kind, resolve_spec
from .chat import ChatRequest, overview_spec
from .errors import GeoChatError
from .families import get_family
from .georef import reproject_geometry, same_crs
from .merge import DEFAULT_IOU
from .pipeline import Job, check_run_id, default_tile_spec
from .tile_types import TileSpec
from .weights.catalog import load_catalog
from .weights.demo import DEMO_GEOPIXEL_NAME, DEMO_NAME, demo_geopixel_dir, demo_model_dir
from .weights.installed import find_installed, installed_model
from .weights.provenance import provenance_attributes

Request = Mapping[str, Any]
TILED_TASKS = frozenset({"refer", "grounding", "segment"})  # run over every tile of the area
DEFAULT_OVERLAP = 0.1
# request key -> backend setting, per backend kind (keys a backend does not take are ignored)
_MODEL_KEYS = {
    "llama.cpp": {"n_threads": "n_threads", "n_gpu_layers": "n_gpu_layers", "n_ctx": "n_ctx",
                  "kv_f32": "kv_f32"},
    "transformers": {"device": "device", "batch_size": "batch_size", "dtype": "dtype"},
    "openai": {"server_url": "base_url", "api_key": "api_key", "max_in_flight": "max_in_flight",
               "timeout": "timeout"},
    "geopixel": {"device": "device", "batch_size": "batch_size", "dtype": "dtype"},
}


def is_tiled(task: str) -> bool:
    """True for tasks that run over every tile of the area; False for one question."""
    return task in TILED_TASKS


def runs_per_tile(request: Request) -> bool:
    """True when ``request`` runs over every tile: a tiled task, or a question asked of each
    tile on its own (``tiling.per_tile``) instead of one overview of the area."""
    tiling = request.get("tiling") or {}
    return is_tiled(str(request.get("task") or "refer")) or bool(tiling.get("per_tile"))


def backend_spec(request: Request) -> BackendSpec:
    """The BackendSpec of ``request["model"]`` (and ``request["family"]`` when given)."""
    model = dict(request.get("model") or {})
    kind = model.get("backend") or ("openai" if model.get("server_url") else None)
    kind = normalise_kind(kind) if kind else None
    settings = _backend_settings(kind, model)
    explicit = dict(model.get("settings") or {})
    family = request.get("family") or None
    if kind == "openai":
        name = model.get("server_model") or model.get("name")
        if not name:
            raise GeoChatError("name the server's model (model.server_model) for the openai "
                               "backend")
        return BackendSpec("openai", str(name), family or _catalog_family(str(name)), None,
                           {**settings, **explicit})
    reference = model.get("model_path") or model.get("name")
    if not reference:
        raise GeoChatError("choose a model: a catalog name, a GGUF file or a checkpoint folder")
    mmproj = model.get("mmproj_path") or None
    if reference == DEMO_NAME:
        reference, kind = str(demo_model_dir(model.get("cache_dir") or None)), "llama.cpp"
    elif reference == DEMO_GEOPIXEL_NAME:
        reference, kind = str(demo_geopixel_dir(model.get("cache_dir") or None)), "geopixel"
    elif not model.get("model_path"):
        reference, mmproj = _converted(str(reference), model) or (reference, mmproj)
    spec = resolve_spec(str(reference), kind, mmproj, family)
    allowed = _allowed_settings(spec.kind)
    mapped = {k: v for k, v in _backend_settings(spec.kind, model).items()
              if allowed is None or k in allowed}
    return replace(spec, settings={**mapped, **explicit})


def model_provenance(spec: Optional[BackendSpec]) -> dict[str, str]:
    """Where the model's weights came from (source, revision, hash, converter, quantisation:
    core/weights/provenance.py), for every result feature; {} for a server model or a model
    with no record."""
    if spec is None or spec.kind == "openai":
        return {}
    return {k: v for k, v in provenance_attributes(spec.model).items() if v}


def _converted(name: str, model: Mapping[str, Any]) -> Optional[tuple[str, Optional[str]]]:
    """(model path, mmproj path) of a catalog model converted by ``models get`` (the request's
    ``model.target``/``model.quant``, else any copy got that the backend loads), or None."""
    try:
        if model.get("target"):
            found = installed_model(name, model.get("target"), model.get("quant"),
                                    model.get("cache_dir") or None)
        else:  # whichever copy was got that the backend loads
            found = find_installed(name, model.get("backend") or None,
                                   model.get("cache_dir") or None)
    except (GeoChatError, KeyError, ValueError):
        return None
    if found is None or found.target == "download":
        return None  # not got, or used as downloaded (the catalog path resolves it)
    return str(found.model_path), str(found.mmproj_path) if found.mmproj_path else None


def _backend_settings(kind: Optional[str], model: Mapping[str, Any]) -> dict[str, Any]:
    """Backend settings named by the request's model keys (the kind's, or every local one)."""
    keys = _MODEL_KEYS.get(kind, {}) if kind else {
        k: v for kind_keys in (_MODEL_KEYS["llama.cpp"], _MODEL_KEYS["transformers"])
        for k, v in kind_keys.items()}
    settings: dict[str, Any] = {}
    for key, setting in keys.items():
        value = model.get(key)
        if value is not None and value != "auto":
            settings[setting] = value
    return settings


def _allowed_settings(kind: str) -> Optional[set[str]]:
    """The setting names the backend's settings dataclass has (None: unknown kind)."""
    if kind not in BACKEND_CLASSES:
        return None
    return {f.name for f in dataclasses.fields(BACKEND_CLASSES[kind][1])}


def _catalog_family(name: str) -> str:
    try:
        catalog = load_catalog()
        return catalog.get(name).family if name in catalog else "geochat"
    except GeoChatError:
        return "geochat"


def family_settings(family: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The family's own settings from the request options (GeoChat: the angle convention)."""
    if family == "geochat" and options.get("angle_convention"):
        return {"angle_convention": options["angle_convention"]}
    return {}


def tile_spec(request: Request, family: str, tiled: bool) -> TileSpec:
    """The family's tile size and pad colour, with the user's size, overlap, GSD and bands.

    A tile size of None or 0 means the family's own (GeoChat 504 px grey, GeoPixel 1680 px
    white, Qwen2.5-VL 896 px); the pad colour is always the family's.
    """
    tiling = dict(request.get("tiling") or {})
    base = default_tile_spec(Job(raster=str(request.get("raster", ""))), get_family(family))
    changes: dict[str, Any] = {"overlap": float(tiling.get("overlap", DEFAULT_OVERLAP))
                               if tiled else 0.0}
    if tiling.get("tile_size"):
        changes["tile_size"] = int(tiling["tile_size"])
    if tiling.get("gsd"):
        changes["gsd"] = float(tiling["gsd"])
    if tiling.get("bands"):
        changes["bands"] = tuple(int(b) for b in tiling["bands"])
    if tiling.get("max_nodata") is not None:
        changes["max_nodata"] = float(tiling["max_nodata"])
    return replace(base, **changes)


def _geometry(wkts: Any) -> Optional[BaseGeometry]:
    if not wkts:
        return None
    items = [wkts] if isinstance(wkts, str) else list(wkts)
    try:
        shapes = [shapely_wkt.loads(text) for text in items]
    except Exception as exc:  # shapely.errors.GEOSException and friends
        raise GeoChatError(f"a geometry of the request is not valid WKT ({exc})") from exc
    return unary_union(shapes)


def area(request: Request) -> tuple[Any, Optional[str], Any]:
    """(extent, extent CRS, aoi) as plan_tiles takes them; the AOI is reprojected into the
    extent's CRS when the two differ."""
    extent = request.get("extent")
    extent = tuple(float(v) for v in extent) if extent else None
    extent_crs = request.get("extent_crs") or None
    aoi: Any = request.get("aoi_path") or None
    shape = _geometry(request.get("aoi_wkt"))
    if shape is not None:
        aoi_crs = request.get("aoi_crs") or extent_crs
        if extent_crs is None:
            extent_crs = aoi_crs
        elif aoi_crs and aoi_crs != extent_crs:
            if not same_crs(aoi_crs, extent_crs):
                shape = reproject_geometry(shape, aoi_crs, extent_crs)
        aoi = shape
    return extent, extent_crs, aoi


def _classes(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(c).strip() for c in items if str(c).strip()]


def overview(request: Request, spec: Optional[BackendSpec] = None) -> tuple[TileSpec, str]:
    """The one-tile spec a question uses for the request's area, and how it is shown."""
    spec = spec or backend_spec(request)
    family = request.get("family") or spec.family
    extent, extent_crs, aoi = area(request)
    return overview_spec(str(request["raster"]), tile_spec(request, family, tiled=False),
                         extent, extent_crs, aoi)


def build_job(request: Request, spec: Optional[BackendSpec] = None) -> Job:
    """The Job for ``request``. A question task (chat, vqa, ...) gets the one-tile overview
    spec (see :func:`overview`); ``spec`` skips resolving the model again."""
    if not request.get("raster"):
        raise GeoChatError("choose a raster layer (the request names no raster)")
    spec = spec or backend_spec(request)
    family = request.get("family") or spec.family
    task = str(request.get("task") or "refer")
    options = dict(request.get("options") or {})
    output = dict(request.get("output") or {})
    prompts = request.get("prompts")
    if prompts is None and request.get("question"):
        prompts = [request["question"]]
    extent, extent_crs, aoi = area(request)
    tiles = (tile_spec(request, family, True) if runs_per_tile(request)
             else overview(request, spec)[0])
    job = Job(
        raster=str(request["raster"]), task=task, prompts=list(prompts or []), family=family,
        extent=extent, extent_crs=extent_crs, aoi=aoi, tile_spec=tiles,
        classes=_classes(request.get("classes")), backend=replace(spec, family=family),
        output_crs=output.get("crs") or None,
        max_new_tokens=int(options.get("max_new_tokens", 256)),
        temperature=float(options.get("temperature", 0.0)),
        grammar=bool(options.get("grammar", False)),
        iou_threshold=float(options.get("iou_threshold", DEFAULT_IOU)),
        family_settings=family_settings(family, options),
    )
    if options.get("max_consecutive_failures"):
        job.max_consecutive_failures = int(options["max_consecutive_failures"])
    if options.get("run_id"):
        job.run_id = check_run_id(options["run_id"])
    return job


def _history(items: Any) -> list[tuple[str, str]]:
    """The earlier turns as (question, answer) pairs; a malformed one is named."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise GeoChatError(f"history must be a list of [question, answer] pairs, not "
                           f"{type(items).__name__}")
    pairs = []
    for number, item in enumerate(items, 1):
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(isinstance(text, str) for text in item)):
            raise GeoChatError(f"history item {number} is not a [question, answer] pair of "
                               f"texts ({str(item)[:80]!r}): start a new conversation")
        pairs.append((item[0], item[1]))
    return pairs


def build_chat(request: Request, spec: Optional[BackendSpec] = None) -> ChatRequest:
    """The ChatRequest for one question (``question``, ``history``, ``region_wkt``...)."""
    if not request.get("raster"):
        raise GeoChatError("choose a raster layer (the request names no raster)")
    spec = spec or backend_spec(request)
    family = request.get("family") or spec.family
    options = dict(request.get("options") or {})
    extent, extent_crs, _aoi = area(request)
    history = _history(request.get("history"))
    return ChatRequest(
        raster=str(request["raster"]), question=str(request.get("question") or ""),
        task=str(request.get("task") or "chat"), family=family, extent=extent,
        extent_crs=extent_crs, history=history, region=_geometry(request.get("region_wkt")),
        region_crs=request.get("region_crs") or None, classes=_classes(request.get("classes")),
        tile_spec=tile_spec(request, family, tiled=False),
        output_crs=(request.get("output") or {}).get("crs") or None,
        max_new_tokens=int(options.get("max_new_tokens", 256)),
        temperature=float(options.get("temperature", 0.0)),
        family_settings=family_settings(family, options),
    )
