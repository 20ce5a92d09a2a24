"""The parameters GeoChat algorithms share, and reading them into the core's objects.

Enums use static strings (``TASK=refer``, ``BACKEND=llama.cpp``), so models, batch rows and
``qgis_process`` command lines name their choices instead of counting them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeatureRequest,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from ..toolbelt.detection_features import crs_to_text

INPUT = "INPUT"
EXTENT = "EXTENT"
AOI = "AOI"
PROMPT = "PROMPT"
TASK = "TASK"
MODEL = "MODEL"
BACKEND = "BACKEND"
MMPROJ = "MMPROJ"
SERVER_URL = "SERVER_URL"
RUNTIME = "RUNTIME"
MAX_NEW_TOKENS = "MAX_NEW_TOKENS"
TILE_SIZE = "TILE_SIZE"
OVERLAP = "OVERLAP"
GSD = "GSD"
BANDS = "BANDS"
IOU = "IOU"
OUTPUT = "OUTPUT"

# the part of each algorithm's help that explains the shared parameters
AREA_HELP = (
    "<b>Extent</b>: default, the whole raster. <b>Area of interest</b>: only tiles touching "
    "its polygons (selected ones, if asked) are run.<br>")
TILING_HELP = (
    "<b>Tile size</b>: default, the model's input size. <b>Ground sample distance</b>: read "
    "coarser than the raster (default: native). <b>Bands</b> (advanced): default, the raster's "
    "RGB.<br>")
OVERLAP_HELP = "<b>Tile overlap</b>: a fraction of the tile (below 1) or pixels.<br>"
MODEL_HELP = (
    "<b>Model</b>: a catalog name, a GGUF file or folder (model + mmproj), a checkpoint folder, "
    "or the served model's name with a <b>Server URL</b> (advanced; API key from "
    "$GEOCHAT_API_KEY). <b>Backend</b> auto: from the model. <b>Model runtime</b> (advanced): "
    "subprocess keeps a crashing model out of QGIS.<br>")

AUTO = "auto"
BACKENDS = (AUTO, "llama.cpp", "transformers", "openai")
RUNTIMES = ("inprocess", "subprocess")


def advanced(parameter: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    """``parameter`` shown under "Advanced parameters"."""
    parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return parameter


def choice(name: str, description: str, options: Sequence[str], default: str
           ) -> QgsProcessingParameterEnum:
    """An enum whose values are its option strings (not their positions)."""
    parameter = QgsProcessingParameterEnum(name, description, list(options),
                                           defaultValue=default)
    parameter.setUsesStaticStrings(True)
    return parameter


crs_text = crs_to_text  # the toolbelt's: one rule for the dock, Processing and exports


# -------------------------------------------------------------------- adding parameters
def add_area_parameters(alg: QgsProcessingAlgorithm) -> None:
    """INPUT raster, optional EXTENT and AOI polygons."""
    alg.addParameter(QgsProcessingParameterRasterLayer(INPUT, "Raster"))
    alg.addParameter(QgsProcessingParameterExtent(
        EXTENT, "Extent", optional=True))
    alg.addParameter(QgsProcessingParameterFeatureSource(
        AOI, "Area of interest (polygons)",
        [QgsProcessing.TypeVectorPolygon], optional=True))


def add_prompt_parameter(alg: QgsProcessingAlgorithm, description: str,
                         optional: bool = False) -> None:
    alg.addParameter(QgsProcessingParameterString(PROMPT, description, multiLine=True,
                                                  optional=optional))


def add_model_parameters(alg: QgsProcessingAlgorithm, backends: Sequence[str] = BACKENDS,
                         mmproj: bool = True) -> None:
    """MODEL, BACKEND, MMPROJ and, advanced, SERVER_URL, RUNTIME and MAX_NEW_TOKENS."""
    alg.addParameter(QgsProcessingParameterString(
        MODEL, "Model (catalog name or path)"))
    if len(backends) > 1:
        alg.addParameter(choice(BACKEND, "Backend", backends,
                                backends[0]))
    if mmproj:
        alg.addParameter(QgsProcessingParameterFile(
            MMPROJ, "Vision projector (mmproj) GGUF",
            extension="gguf", optional=True))
        alg.addParameter(advanced(QgsProcessingParameterString(
            SERVER_URL, "Server URL (OpenAI-compatible)", optional=True)))
    alg.addParameter(advanced(choice(
        RUNTIME, "Model runtime",
        RUNTIMES, RUNTIMES[0])))
    alg.addParameter(advanced(QgsProcessingParameterNumber(
        MAX_NEW_TOKENS, "Tokens per answer (most)", QgsProcessingParameterNumber.Integer,
        defaultValue=256, minValue=1)))


def add_tiling_parameters(alg: QgsProcessingAlgorithm, overlap: bool = True) -> None:
    """TILE_SIZE, OVERLAP, GSD and, advanced, BANDS."""
    alg.addParameter(QgsProcessingParameterNumber(
        TILE_SIZE, "Tile size (pixels)",
        QgsProcessingParameterNumber.Integer, optional=True, minValue=1))
    if overlap:
        alg.addParameter(QgsProcessingParameterNumber(
            OVERLAP, "Tile overlap (fraction, or pixels)",
            QgsProcessingParameterNumber.Double, defaultValue=0.1, minValue=0.0))
    alg.addParameter(QgsProcessingParameterNumber(
        GSD, "Ground sample distance (m/pixel)",
        QgsProcessingParameterNumber.Double, optional=True, minValue=0.0))
    alg.addParameter(advanced(QgsProcessingParameterString(
        BANDS, "Bands as R,G,B (e.g. 4,3,2)", optional=True)))


def add_merge_parameter(alg: QgsProcessingAlgorithm) -> None:
    alg.addParameter(advanced(QgsProcessingParameterNumber(
        IOU, "Merge overlap (IoU) across tiles",
        QgsProcessingParameterNumber.Double, defaultValue=0.5, minValue=0.0, maxValue=1.0)))


# -------------------------------------------------------------------- reading parameters
@dataclass
class Area:
    """The raster and the part of it a job covers, as the core's Job takes them."""

    raster: str
    crs: QgsCoordinateReferenceSystem
    extent: Optional[tuple[float, float, float, float]] = None
    extent_crs: Optional[str] = None
    aoi: Any = None  # a shapely geometry in extent_crs (or the raster's CRS)


def read_area(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext
              ) -> Area:
    """INPUT, EXTENT and AOI; QgsProcessingException for a raster GDAL cannot read."""
    layer = alg.parameterAsRasterLayer(parameters, INPUT, context)
    if layer is None:
        raise QgsProcessingException(alg.invalidRasterError(parameters, INPUT))
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"{layer.name()} is a {layer.providerType()} layer: GeoChat reads rasters through "
            "GDAL. Save it as a GeoTIFF first (Export > Save As...).")
    area = Area(layer.source(), layer.crs())
    target = layer.crs()
    if parameters.get(EXTENT) not in (None, ""):
        rect = alg.parameterAsExtent(parameters, EXTENT, context)
        if not rect.isNull():
            extent_crs = alg.parameterAsExtentCrs(parameters, EXTENT, context)
            area.extent = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
            if extent_crs.isValid():
                area.extent_crs, target = crs_text(extent_crs), extent_crs
    if parameters.get(AOI) not in (None, ""):
        source = alg.parameterAsSource(parameters, AOI, context)
        if source is None:
            raise QgsProcessingException(alg.invalidSourceError(parameters, AOI))
        area.aoi = polygons_of(source, target, context)
    return area


def polygons_of(source, crs: QgsCoordinateReferenceSystem, context: QgsProcessingContext):
    """The union of ``source``'s geometries in ``crs``, as one shapely geometry."""
    import shapely

    from ..toolbelt.feature_detections import to_shapely

    request = QgsFeatureRequest().setDestinationCrs(crs, context.transformContext())
    request.setNoAttributes()
    parts = [to_shapely(feature.geometry()) for feature in source.getFeatures(request)
             if not feature.geometry().isEmpty()]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def read_prompts(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext
                 ) -> list[str]:
    """PROMPT split into its non-empty lines."""
    text = alg.parameterAsString(parameters, PROMPT, context) or ""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_backend(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
                 kind: Optional[str] = None, family: Optional[str] = None,
                 settings: Optional[dict[str, Any]] = None):
    """The core BackendSpec of MODEL, BACKEND (or ``kind``), MMPROJ and SERVER_URL."""
    from ..core.backends.factory import resolve_spec
    from ..core.backends.openai_http import API_KEY_ENV

    model = (alg.parameterAsString(parameters, MODEL, context) or "").strip()
    if not model:
        raise QgsProcessingException(
            "Give a MODEL: a catalog name (python -m geochat_qgis models list), a GGUF file or "
            "folder, a checkpoint folder, or the model name a server serves.")
    if kind is None and BACKEND in parameters:
        chosen = alg.parameterAsEnumString(parameters, BACKEND, context)
        kind = None if chosen in ("", AUTO) else chosen
    settings = dict(settings or {})
    server = (alg.parameterAsString(parameters, SERVER_URL, context) or "").strip()
    if server and kind in (None, "openai"):
        kind = "openai"
        settings["base_url"] = server
    if kind == "openai" and os.environ.get(API_KEY_ENV):
        settings["api_key"] = os.environ[API_KEY_ENV]
    mmproj = (alg.parameterAsFile(parameters, MMPROJ, context) or "").strip() or None
    return resolve_spec(model, kind, mmproj, family, settings)


def read_runtime(alg: QgsProcessingAlgorithm, parameters: dict,
                 context: QgsProcessingContext) -> str:
    return alg.parameterAsEnumString(parameters, RUNTIME, context) or RUNTIMES[0]


def read_tile_spec(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
                   raster: str, family: str):
    """The family's TileSpec with TILE_SIZE, OVERLAP, GSD and BANDS applied."""
    from ..core.families import get_family
    from ..core.pipeline import Job, default_tile_spec

    spec = default_tile_spec(Job(raster=raster), get_family(family))
    changes: dict[str, Any] = {}
    if parameters.get(TILE_SIZE) not in (None, ""):
        changes["tile_size"] = alg.parameterAsInt(parameters, TILE_SIZE, context)
    if alg.parameterDefinition(OVERLAP) is not None:
        changes["overlap"] = alg.parameterAsDouble(parameters, OVERLAP, context)
    if parameters.get(GSD) not in (None, "") and alg.parameterAsDouble(parameters, GSD, context):
        changes["gsd"] = alg.parameterAsDouble(parameters, GSD, context)
    bands = (alg.parameterAsString(parameters, BANDS, context) or "").strip()
    if bands:
        try:
            changes["bands"] = tuple(int(v) for v in bands.replace(" ", "").split(","))
        except ValueError:
            raise QgsProcessingException(
                f"BANDS {bands!r} is not a list of band numbers: give them like 4,3,2.") from None
    return replace(spec, **changes)


def read_job(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
             area: Area, spec, tile_spec, **fields: Any):
    """The core Job of the area, PROMPT, TASK, the backend spec and MAX_NEW_TOKENS, plus
    ``fields`` (an algorithm's own Job settings)."""
    from ..core.pipeline import Job

    return Job(
        raster=area.raster, task=alg.parameterAsEnumString(parameters, TASK, context),
        prompts=read_prompts(alg, parameters, context), family=spec.family,
        extent=area.extent, extent_crs=area.extent_crs, aoi=area.aoi, tile_spec=tile_spec,
        backend=spec, max_new_tokens=alg.parameterAsInt(parameters, MAX_NEW_TOKENS, context),
        **fields)
