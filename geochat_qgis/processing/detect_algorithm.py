"""``geochat:detect``: a raster's tiles -> a vision-language model -> detections as polygons.

The run happens in GeoChat's runtime child, which writes the output file itself."""
from __future__ import annotations

from typing import Any, Optional

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterVectorDestination,
)

from . import parameters as p
from .base import GeoChatAlgorithm
from .output_style import DetectionStyle
from .outputs import output_file, point_loading_to
from .request import read_area, read_model, read_request
from .running import run_request

GRAMMAR = "GRAMMAR"
DETECTIONS = "DETECTIONS"
TILES_DONE = "TILES_DONE"


class DetectAlgorithm(GeoChatAlgorithm):
    """Referring detection (``[refer]``) or grounded description (``[grounding]``) per tile."""

    NAME = "detect"
    DISPLAY_NAME = "Detect objects"
    HELP = (
        "Asks a vision-language model (GeoChat, Qwen2.5-VL) to find objects in every tile of "
        "the raster's extent or area of interest, and writes what it finds as polygons in the "
        "raster's CRS, merged across tile overlaps, to a GeoPackage, Shapefile or GeoJSON.<br>"
        "<br><b>Prompt</b>: one thing to find per line (each tile is asked each line).<br>"
        "<b>Task</b>: refer finds the objects a prompt names; grounding describes each tile "
        "with boxes around the objects it mentions.<br>"
        + p.AREA_HELP + p.MODEL_HELP + p.TILING_HELP + p.OVERLAP_HELP
        + "Cancelling writes the detections of the finished tiles. An existing output file is "
        "replaced only by a complete run (a partial one is written beside it)."
    )
    TASKS = ("refer", "grounding")
    BACKENDS = p.BACKENDS
    OUTPUT_NAME = "Detections"
    KIND: Optional[str] = None  # a fixed backend, else BACKEND
    BOX_GRAMMAR = True  # offer GRAMMAR (answers constrained to box syntax)

    def initAlgorithm(self, config: Optional[dict[str, Any]] = None) -> None:  # noqa: N802
        p.add_area_parameters(self)
        p.add_prompt_parameter(self, "Prompt (one thing to find per line)", optional=True)
        self.addParameter(p.choice(p.TASK, "Task", self.TASKS, self.TASKS[0]))
        self.add_model_parameters()
        p.add_tiling_parameters(self)
        p.add_merge_parameter(self)
        if self.BOX_GRAMMAR:
            self.addParameter(p.advanced(QgsProcessingParameterBoolean(
                GRAMMAR, "Constrain answers to the model's box syntax (llama.cpp backends)",
                defaultValue=False)))
        self.addParameter(QgsProcessingParameterVectorDestination(
            p.OUTPUT, self.OUTPUT_NAME, QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(DETECTIONS, "Number of detections"))
        self.addOutput(QgsProcessingOutputNumber(TILES_DONE, "Tiles processed"))

    def add_model_parameters(self) -> None:
        p.add_model_parameters(self, self.BACKENDS)

    def read_model(self, parameters: dict, context: QgsProcessingContext) -> dict[str, Any]:
        return read_model(self, parameters, context, self.KIND)

    def check_runtime(self) -> None:
        """Anything the runtime must have before this algorithm's run (none so far)."""

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        area = read_area(self, parameters, context)
        options: dict[str, Any] = {"iou_threshold": self.parameterAsDouble(parameters, p.IOU,
                                                                           context)}
        if self.BOX_GRAMMAR:
            options["grammar"] = self.parameterAsBoolean(parameters, GRAMMAR, context)
        request = read_request(self, parameters, context, area,
                               self.read_model(parameters, context), **options)
        requested, path, layer = output_file(self, parameters, context, p.OUTPUT)
        request["output"] = {"path": str(path), **({"layer": layer} if layer else {})}
        self.check_runtime()
        result = run_request(request, feedback)

        written = result.output or str(path)
        if written != str(path):
            point_loading_to(context, requested, written)
            requested = written
        DetectionStyle.attach(context, requested, list(result.counts),
                              self.KIND == "geopixel")
        return {p.OUTPUT: requested, DETECTIONS: result.features,
                TILES_DONE: result.tiles_done}
