"""Reading an algorithm's parameters into the runtime's request: a plain JSON dict of the user's
choices (keys: see ``geochat_qgis/client/__init__.py``). Nothing is resolved here: tile size,
pad colour and backend come from the core's ``build_job`` in the runtime child."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeatureRequest,
    QgsGeometry,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsWkbTypes,
)

from . import parameters as p

API_KEY_ENV = "GEOCHAT_API_KEY"  # the openai backend's key, read here and sent with the request


def crs_text(crs: QgsCoordinateReferenceSystem) -> Optional[str]:
    """A CRS as the core takes it: 'EPSG:n' when QGIS knows the code, else WKT; None if invalid."""
    if not crs.isValid():
        return None
    if crs.authid().upper().startswith("EPSG:"):
        return crs.authid()
    return crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)


@dataclass
class Area:
    """The raster layer and the request keys of the part of it a run covers."""

    raster: str
    name: str
    crs: QgsCoordinateReferenceSystem
    keys: dict[str, Any] = field(default_factory=dict)  # raster, extent, aoi_wkt...


def read_area(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext
              ) -> Area:
    """INPUT, EXTENT and AOI; QgsProcessingException for a raster GDAL cannot read, a raster
    without a CRS, an empty extent or an area of interest without polygons."""
    layer = alg.parameterAsRasterLayer(parameters, p.INPUT, context)
    if layer is None:
        raise QgsProcessingException(alg.invalidRasterError(parameters, p.INPUT))
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"{layer.name()} is a {layer.providerType()} layer: GeoChat reads rasters through "
            "GDAL. Save it as a GeoTIFF first (Export > Save As...).")
    if not layer.crs().isValid():
        raise QgsProcessingException(
            f"{layer.name()} has no coordinate reference system: set it in the layer's "
            "properties (Source > Assigned CRS) or with Raster > Projections > Assign "
            "Projection, then run again.")
    source = layer.source()
    if Path(source).exists():  # the runtime child may run in another folder
        source = str(Path(source).resolve())
    area = Area(source, layer.name(), layer.crs(), {"raster": source})
    if parameters.get(p.EXTENT) not in (None, ""):
        read_extent(alg, parameters, context, area)
    if parameters.get(p.AOI) not in (None, ""):
        read_aoi(alg, parameters, context, area)
    return area


def read_extent(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
                area: Area) -> None:
    """EXTENT (and its CRS, when it is not the raster's) into ``area.keys``."""
    rect = alg.parameterAsExtent(parameters, p.EXTENT, context)
    if rect.isNull():
        return
    values = [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]
    if not all(math.isfinite(v) for v in values) or rect.width() <= 0 or rect.height() <= 0:
        raise QgsProcessingException(
            f"The extent {rect.toString()} is empty or not finite: draw or type an extent "
            "with a width and a height, or leave it empty for the whole raster.")
    area.keys["extent"] = values
    crs = alg.parameterAsExtentCrs(parameters, p.EXTENT, context)
    if crs.isValid() and crs != area.crs:
        area.keys["extent_crs"] = crs_text(crs)


def read_aoi(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
             area: Area) -> None:
    """AOI's polygons as WKT (one per feature) with the layer's CRS into ``area.keys``."""
    source = alg.parameterAsSource(parameters, p.AOI, context)
    if source is None:
        raise QgsProcessingException(alg.invalidSourceError(parameters, p.AOI))
    layer = alg.parameterAsVectorLayer(parameters, p.AOI, context)
    name = layer.name() if layer is not None else source.sourceName()
    request = QgsFeatureRequest().setNoAttributes()
    wkts = [geometry_wkt(f.geometry()) for f in source.getFeatures(request)
            if f.hasGeometry() and not f.geometry().isEmpty()]
    if not wkts:
        count = source.featureCount()
        why = (f"its {count} features have no geometry" if count > 0
               else "it has no features (or none is selected, when only selected ones count)")
        raise QgsProcessingException(
            f"The area of interest {name or '(unnamed layer)'} has no polygons ({why}): draw "
            "or select at least one, or leave the area of interest empty for the whole extent.")
    area.keys["aoi_wkt"] = wkts
    crs = source.sourceCrs()
    area.keys["aoi_crs"] = crs_text(crs) if crs.isValid() else crs_text(area.crs)


def geometry_wkt(geometry: QgsGeometry) -> str:
    """2D WKT with straight segments (what the core's WKT reader takes from any polygon)."""
    flat = QgsGeometry(geometry)
    if QgsWkbTypes.isCurvedType(flat.wkbType()):
        flat.convertToStraightSegment()
    shape = flat.get()
    shape.dropZValue()
    shape.dropMValue()
    return flat.asWkt()


def read_prompts(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext
                 ) -> list[str]:
    """PROMPT split into its non-empty lines."""
    text = alg.parameterAsString(parameters, p.PROMPT, context) or ""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_model(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
               kind: Optional[str] = None, extra: Optional[dict[str, Any]] = None
               ) -> dict[str, Any]:
    """The request's ``model``: MODEL (a path or a name), BACKEND (or ``kind``), MMPROJ,
    SERVER_URL (+ the API key from $GEOCHAT_API_KEY) and ``extra`` keys."""
    name = (alg.parameterAsString(parameters, p.MODEL, context) or "").strip()
    if not name:
        raise QgsProcessingException(
            "Give a MODEL: a catalog name (tiny-demo, geochat-7b...), a GGUF file or folder, a "
            "checkpoint folder, or the model name a server serves.")
    if kind is None and alg.parameterDefinition(p.BACKEND) is not None:
        chosen = alg.parameterAsEnumString(parameters, p.BACKEND, context)
        kind = None if chosen in ("", p.AUTO) else chosen
    model: dict[str, Any] = dict(extra or {})
    server = ""
    if alg.parameterDefinition(p.SERVER_URL) is not None:
        server = (alg.parameterAsString(parameters, p.SERVER_URL, context) or "").strip()
    if server and kind in (None, "openai"):
        kind = "openai"
        model.update(server_url=server, server_model=name)
        if os.environ.get(API_KEY_ENV):
            model["api_key"] = os.environ[API_KEY_ENV]
    elif Path(name).expanduser().exists():
        model["model_path"] = str(Path(name).expanduser())
    else:
        model["name"] = name
    if kind == "openai" and not server:
        model["server_model"] = name
    if kind:
        model["backend"] = kind
    if alg.parameterDefinition(p.MMPROJ) is not None:
        mmproj = (alg.parameterAsFile(parameters, p.MMPROJ, context) or "").strip()
        if mmproj:
            model["mmproj_path"] = mmproj
    return model


def read_tiling(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext
                ) -> dict[str, Any]:
    """The request's ``tiling``: only what the user chose (the rest is the model family's)."""
    tiling: dict[str, Any] = {}
    if parameters.get(p.TILE_SIZE) not in (None, ""):
        tiling["tile_size"] = alg.parameterAsInt(parameters, p.TILE_SIZE, context)
    if alg.parameterDefinition(p.OVERLAP) is not None:
        tiling["overlap"] = alg.parameterAsDouble(parameters, p.OVERLAP, context)
    if parameters.get(p.GSD) not in (None, "") and alg.parameterAsDouble(parameters, p.GSD,
                                                                         context):
        tiling["gsd"] = alg.parameterAsDouble(parameters, p.GSD, context)
    bands = (alg.parameterAsString(parameters, p.BANDS, context) or "").strip()
    if bands:
        try:
            tiling["bands"] = [int(v) for v in bands.replace(" ", "").split(",")]
        except ValueError:
            raise QgsProcessingException(
                f"BANDS {bands!r} is not a list of band numbers: give them like 4,3,2.") from None
        if any(b < 1 for b in tiling["bands"]):
            raise QgsProcessingException(
                f"BANDS {bands!r}: band numbers start at 1; give them like 4,3,2.")
    return tiling


def read_request(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
                 area: Area, model: dict[str, Any], **options: Any) -> dict[str, Any]:
    """The whole request: the area, TASK, PROMPT, the model, the tiling and MAX_NEW_TOKENS
    plus ``options`` (an algorithm's own, e.g. grammar, iou_threshold)."""
    return {
        **area.keys,
        "task": alg.parameterAsEnumString(parameters, p.TASK, context),
        "prompts": read_prompts(alg, parameters, context),
        "model": model,
        "tiling": read_tiling(alg, parameters, context),
        "options": {"max_new_tokens": alg.parameterAsInt(parameters, p.MAX_NEW_TOKENS,
                                                         context), **options},
    }
