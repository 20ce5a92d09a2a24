"""``geochat:describe``: a model's text answers about a raster area, to HTML or text, plus the
footprints of the tiles it looked at."""
from __future__ import annotations

import html
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsFields,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterString,
    QgsWkbTypes,
)
from ..core.threads import in_python_thread
from ..toolbelt.fields import make_fields
from . import parameters as p
from .base import GeoChatAlgorithm
from .running import run_with_feedback

CLASSES = "CLASSES"
OVERVIEW = "OVERVIEW"
OUTPUT_HTML = "OUTPUT_HTML"
ANSWER = "ANSWER"
TEXT_SUFFIXES = (".txt", ".text")


class DescribeAlgorithm(GeoChatAlgorithm):
    """Caption, chat, VQA or scene classification of an area, as text."""

    NAME = "describe"
    DISPLAY_NAME = "Describe area"
    HELP = (
        "Asks a vision-language model about the raster's extent or area of interest and writes "
        "its answers to an HTML or text file (.txt), with the footprints of the tiles it looked "
        "at as polygons.<br><br>"
        "<b>Overview</b> (default): the whole area as one tile, downsampled when it is larger "
        "than the model's input; otherwise every tile is answered on its own.<br>"
        "<b>Task</b>: caption (a description), chat (the prompt as is), vqa (a short answer), "
        "classify (one of the comma-separated classes).<br>"
        "<b>Prompt</b>: one question per line (caption and classify need none).<br>"
        + p.AREA_HELP + p.MODEL_HELP + p.TILING_HELP
    )
    TASKS = ("caption", "chat", "vqa", "classify")

    def initAlgorithm(self, config: Optional[dict[str, Any]] = None) -> None:  # noqa: N802
        p.add_area_parameters(self)
        p.add_prompt_parameter(self, "Prompt (one question per line)", optional=True)
        self.addParameter(p.choice(p.TASK, "Task", self.TASKS, self.TASKS[0]))
        self.addParameter(QgsProcessingParameterString(
            CLASSES, "Classes (classify; comma-separated)", optional=True))
        self.addParameter(QgsProcessingParameterBoolean(
            OVERVIEW, "Whole area as one overview tile", defaultValue=True))
        p.add_model_parameters(self)
        p.add_tiling_parameters(self, overlap=False)
        self.addParameter(QgsProcessingParameterFileDestination(
            OUTPUT_HTML, "Answers", "HTML files (*.html);;Text files (*.txt)"))
        self.addParameter(QgsProcessingParameterFeatureSink(
            p.OUTPUT, "Tile footprints", QgsProcessing.TypeVectorPolygon, optional=True))
        self.addOutput(QgsProcessingOutputString(ANSWER, "First answer"))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from ..core.chat import overview_spec
        from ..core.errors import GeoChatError
        from ..core.tiling import plan_tiles

        area = p.read_area(self, parameters, context)
        classes = self.parameterAsString(parameters, CLASSES, context) or ""
        try:
            spec = p.read_backend(self, parameters, context)
            tiles = p.read_tile_spec(self, parameters, context, area.raster, spec.family)
            if self.parameterAsBoolean(parameters, OVERVIEW, context):
                tiles, how = in_python_thread(overview_spec, area.raster, tiles, area.extent,
                                              area.extent_crs, area.aoi)
                feedback.pushInfo(f"Looking at {how}")
            job = p.read_job(self, parameters, context, area, spec, tiles,
                             classes=[c.strip() for c in classes.split(",") if c.strip()])
            plan = in_python_thread(plan_tiles, area.raster, tiles, extent=area.extent,
                                    extent_crs=area.extent_crs, aoi=area.aoi)
        except GeoChatError as exc:
            raise QgsProcessingException(str(exc)) from exc
        result = run_with_feedback(job, p.read_runtime(self, parameters, context), feedback)

        path = Path(self.parameterAsFileOutput(parameters, OUTPUT_HTML, context))
        text = (answers_text if path.suffix.lower() in TEXT_SUFFIXES else answers_html)(
            result, job, area.raster)
        write_atomic(path, text)
        first = answer_text(result.answers[0]) if result.answers else ""
        outputs: dict[str, Any] = {OUTPUT_HTML: str(path), ANSWER: first}
        fields = footprint_fields()
        sink, dest = self.parameterAsSink(parameters, p.OUTPUT, context, fields,
                                          QgsWkbTypes.Polygon, area.crs)
        if sink is not None:
            footprints = {tile.tile_id: tile.footprint for tile in plan.tiles}
            for answer in result.answers:
                sink.addFeature(footprint_feature(answer, footprints[answer.tile_id], fields),
                                QgsFeatureSink.FastInsert)
            outputs[p.OUTPUT] = dest
        return outputs


def answer_text(answer) -> str:
    """What the model said: the parsed text, else the raw answer."""
    return answer.text or answer.raw


def footprint_fields() -> QgsFields:
    return make_fields([("tile_id", "str"), ("prompt", "str"), ("answer", "str"),
                        ("tokens", "int"), ("seconds", "float")])


def footprint_feature(answer, footprint, fields: QgsFields) -> QgsFeature:
    """One tile's footprint (raster CRS) with what the model answered there."""
    import shapely

    feature = QgsFeature(fields)
    geometry = QgsGeometry()
    geometry.fromWkb(shapely.to_wkb(footprint, output_dimension=2))  # see detection_feature
    feature.setGeometry(geometry)
    feature.setAttributes([answer.tile_id, answer.prompt, answer_text(answer),
                           answer.generated_tokens, round(answer.seconds, 3)])
    return feature


def answers_text(result, job, raster: str) -> str:
    """The answers as plain text: a header, then one block per tile and prompt."""
    lines = [f"GeoChat {job.task} of {raster}", f"Model: {result.model}", ""]
    for answer in result.answers:
        lines.append(f"[tile {answer.tile_id}]" + (f" {answer.prompt}" if answer.prompt else ""))
        lines += [answer_text(answer), ""]
    return "\n".join(lines)


def answers_html(result, job, raster: str) -> str:
    """The answers as a small standalone HTML page."""
    esc = html.escape
    sections = []
    for answer in result.answers:
        question = f"<p class='prompt'>{esc(answer.prompt)}</p>" if answer.prompt else ""
        body = "<br>".join(esc(line) for line in answer_text(answer).splitlines())
        sections.append(f"<section><h2>Tile {esc(answer.tile_id)}</h2>{question}"
                        f"<p class='answer'>{body}</p></section>")
    title = f"GeoChat {job.task}: {Path(raster).name}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title></head><body>\n<h1>{esc(title)}</h1>\n"
        f"<p>Model: {esc(result.model)}; {result.tiles_done} of {result.tiles_planned} tiles"
        f"{'; cancelled' if result.cancelled else ''}</p>\n"
        + "\n".join(sections) + "\n</body></html>\n"
    )


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` under a temporary name, then rename it into place."""
    if not path.parent.is_dir():
        raise QgsProcessingException(f"The folder {path.parent} does not exist: choose another.")
    temp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
