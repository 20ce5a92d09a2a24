"""The parameters GeoChat algorithms share: their names, help text and definitions.

Enums use static strings (``TASK=refer``, ``BACKEND=llama.cpp``), so models, batch rows and
``qgis_process`` command lines name their choices instead of counting them. Reading them into a
runtime request is :mod:`.request`'s job.
"""
from __future__ import annotations

from typing import Sequence

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

INPUT = "INPUT"
EXTENT = "EXTENT"
AOI = "AOI"
PROMPT = "PROMPT"
TASK = "TASK"
MODEL = "MODEL"
BACKEND = "BACKEND"
MMPROJ = "MMPROJ"
SERVER_URL = "SERVER_URL"
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
    "<b>Model</b>: a catalog name (tiny-demo: a random-weight demo that proves the set-up), a "
    "GGUF file or folder (model + mmproj), a checkpoint folder, or the served model's name with "
    "a <b>Server URL</b> (advanced; API key from $GEOCHAT_API_KEY). <b>Backend</b> auto: from "
    "the model. The model runs in GeoChat's runtime, a separate process: install it once with "
    "Raster > GeoChat > Install model dependencies...<br>")

AUTO = "auto"
BACKENDS = (AUTO, "llama.cpp", "transformers", "openai")


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


def add_area_parameters(alg: QgsProcessingAlgorithm) -> None:
    """INPUT raster, optional EXTENT and AOI polygons."""
    alg.addParameter(QgsProcessingParameterRasterLayer(INPUT, "Raster"))
    alg.addParameter(QgsProcessingParameterExtent(EXTENT, "Extent", optional=True))
    alg.addParameter(QgsProcessingParameterFeatureSource(
        AOI, "Area of interest (polygons)", [QgsProcessing.TypeVectorPolygon], optional=True))


def add_prompt_parameter(alg: QgsProcessingAlgorithm, description: str,
                         optional: bool = False) -> None:
    alg.addParameter(QgsProcessingParameterString(PROMPT, description, multiLine=True,
                                                  optional=optional))


def add_model_parameters(alg: QgsProcessingAlgorithm, backends: Sequence[str] = BACKENDS,
                         mmproj: bool = True) -> None:
    """MODEL, BACKEND, MMPROJ and, advanced, SERVER_URL and MAX_NEW_TOKENS."""
    alg.addParameter(QgsProcessingParameterString(MODEL, "Model (catalog name or path)"))
    if len(backends) > 1:
        alg.addParameter(choice(BACKEND, "Backend", backends, backends[0]))
    if mmproj:
        alg.addParameter(QgsProcessingParameterFile(
            MMPROJ, "Vision projector (mmproj) GGUF", extension="gguf", optional=True))
        alg.addParameter(advanced(QgsProcessingParameterString(
            SERVER_URL, "Server URL (OpenAI-compatible)", optional=True)))
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
