"""``geochat:detect``: a raster's tiles -> a vision-language model -> detections as polygons."""
from __future__ import annotations

from typing import Any, Optional

from qgis.core import (
    QgsFeatureSink,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFeatureSink,
    QgsWkbTypes,
)

from . import parameters as p
from .base import GeoChatAlgorithm
from .output_style import DetectionStyle
from .running import run_with_feedback

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
        "raster's CRS, merged across tile overlaps.<br><br>"
        "<b>Prompt</b>: one thing to find per line (each tile is asked each line).<br>"
        "<b>Task</b>: refer finds the objects a prompt names; grounding describes each tile "
        "with boxes around the objects it mentions.<br>"
        + p.AREA_HELP + p.MODEL_HELP + p.TILING_HELP + p.OVERLAP_HELP
        + "Cancelling keeps the detections of the finished tiles."
    )
    TASKS = ("refer", "grounding")
    BACKENDS = p.BACKENDS
    OUTPUT_NAME = "Detections"
    KIND: Optional[str] = None  # a fixed backend, else BACKEND
    FAMILY: Optional[str] = None  # a fixed model family, else from the model
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
        self.addParameter(QgsProcessingParameterFeatureSink(
            p.OUTPUT, self.OUTPUT_NAME, QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(DETECTIONS, "Number of detections"))
        self.addOutput(QgsProcessingOutputNumber(TILES_DONE, "Tiles processed"))

    def add_model_parameters(self) -> None:
        p.add_model_parameters(self, self.BACKENDS)

    def read_backend(self, parameters: dict, context: QgsProcessingContext):
        return p.read_backend(self, parameters, context, self.KIND, self.FAMILY)

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from ..core.errors import GeoChatError
        from ..core.export import now_iso
        from ..toolbelt.detection_features import detection_features, detection_fields

        area = p.read_area(self, parameters, context)
        try:
            spec = self.read_backend(parameters, context)
            job = p.read_job(
                self, parameters, context, area, spec,
                p.read_tile_spec(self, parameters, context, area.raster, spec.family),
                iou_threshold=self.parameterAsDouble(parameters, p.IOU, context),
                grammar=self.BOX_GRAMMAR and self.parameterAsBoolean(parameters, GRAMMAR,
                                                                     context))
        except GeoChatError as exc:
            raise QgsProcessingException(str(exc)) from exc
        result = run_with_feedback(job, p.read_runtime(self, parameters, context), feedback)

        fields = detection_fields()
        sink, dest = self.parameterAsSink(parameters, p.OUTPUT, context, fields,
                                          QgsWkbTypes.MultiPolygon, area.crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, p.OUTPUT))
        provenance = {"task": job.task, "model": result.model, "raster": area.raster,
                      "run_id": job.run_id, "created": now_iso()}
        for feature in detection_features(result.detections, fields, provenance):
            geometry = feature.geometry()
            geometry.convertToMultiType()
            feature.setGeometry(geometry)
            if not sink.addFeature(feature, QgsFeatureSink.FastInsert):
                raise QgsProcessingException(self.writeFeatureError(sink, parameters, p.OUTPUT))
        masks = bool(result.detections) and all(d.kind == "mask" for d in result.detections)
        DetectionStyle.attach(context, dest, [d.label for d in result.detections], masks)
        return {p.OUTPUT: dest, DETECTIONS: len(result.detections),
                TILES_DONE: result.tiles_done}
