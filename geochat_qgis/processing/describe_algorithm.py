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
    QgsProcessingUtils,
    QgsWkbTypes,
)

from ..client import PlanResult, RunResult
from ..toolbelt.fields import make_fields
from . import parameters as p
from .base import GeoChatAlgorithm
from .request import read_area, read_model, read_request
from .running import call, ready_client, run_request

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
        area = read_area(self, parameters, context)
        classes = self.parameterAsString(parameters, CLASSES, context) or ""
        request = read_request(self, parameters, context, area,
                               read_model(self, parameters, context))
        request["classes"] = [c.strip() for c in classes.split(",") if c.strip()]
        if not self.parameterAsBoolean(parameters, OVERVIEW, context):
            request["tiling"].update(per_tile=True, overlap=0.0)
        path = Path(self.parameterAsFileOutput(parameters, OUTPUT_HTML, context))
        if not path.parent.is_dir():
            raise QgsProcessingException(
                f"The folder {path.parent} does not exist: choose another for the answers.")
        # the runtime writes a (here unused) result layer of the boxes answers may hold
        request["output"] = {"path": QgsProcessingUtils.generateTempFilename("describe.gpkg")}
        plan: PlanResult = call(ready_client().plan, request)
        feedback.pushInfo(plan.message)
        result = run_request(request, feedback)

        path = answers_path(path, result)
        if result.cancelled or result.error:
            feedback.pushWarning(f"The answers of the finished tiles go to {path}.")
        write_atomic(path, (answers_text if path.suffix.lower() in TEXT_SUFFIXES
                            else answers_html)(result, request["task"], area.raster))
        first = answer_text(result.answers[0]) if result.answers else ""
        outputs: dict[str, Any] = {OUTPUT_HTML: str(path), ANSWER: first}
        fields = footprint_fields()
        sink, dest = self.parameterAsSink(parameters, p.OUTPUT, context, fields,
                                          QgsWkbTypes.Polygon, area.crs)
        if sink is not None:
            footprints = dict(zip(plan.tile_ids, plan.footprints_wkt))
            for answer in result.answers:
                feature = footprint_feature(answer, footprints.get(answer["tile_id"]), fields)
                if not sink.addFeature(feature, QgsFeatureSink.FastInsert):
                    raise QgsProcessingException(self.writeFeatureError(sink, parameters,
                                                                        p.OUTPUT))
            outputs[p.OUTPUT] = dest
        return outputs


def answer_text(answer: dict[str, Any]) -> str:
    """What the model said: the parsed text, else the raw answer."""
    return answer.get("text") or answer.get("raw") or ""


def footprint_fields() -> QgsFields:
    return make_fields([("tile_id", "str"), ("prompt", "str"), ("answer", "str"),
                        ("tokens", "int"), ("seconds", "float")])


def footprint_feature(answer: dict[str, Any], footprint_wkt: Optional[str],
                      fields: QgsFields) -> QgsFeature:
    """One tile's footprint (the plan's WKT, raster CRS) with what the model answered there."""
    feature = QgsFeature(fields)
    if footprint_wkt:
        feature.setGeometry(QgsGeometry.fromWkt(footprint_wkt))
    feature.setAttributes([answer.get("tile_id"), answer.get("prompt"), answer_text(answer),
                           answer.get("generated_tokens"), round(answer.get("seconds", 0.0), 3)])
    return feature


def answers_text(result: RunResult, task: str, raster: str) -> str:
    """The answers as plain text: a header, then one block per tile and prompt."""
    lines = [f"GeoChat {task} of {raster}", f"Model: {result.model}", ""]
    for answer in result.answers:
        prompt = answer.get("prompt")
        lines.append(f"[tile {answer.get('tile_id')}]" + (f" {prompt}" if prompt else ""))
        lines += [answer_text(answer), ""]
    return "\n".join(lines)


def answers_html(result: RunResult, task: str, raster: str) -> str:
    """The answers as a small standalone HTML page."""
    esc = html.escape
    sections = []
    for answer in result.answers:
        prompt = answer.get("prompt")
        question = f"<p class='prompt'>{esc(prompt)}</p>" if prompt else ""
        body = "<br>".join(esc(line) for line in answer_text(answer).splitlines())
        sections.append(f"<section><h2>Tile {esc(str(answer.get('tile_id')))}</h2>{question}"
                        f"<p class='answer'>{body}</p></section>")
    title = f"GeoChat {task}: {Path(raster).name}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title></head><body>\n<h1>{esc(title)}</h1>\n"
        f"<p>Model: {esc(result.model)}; {result.tiles_done} of {result.tiles_planned} tiles"
        f"{'; cancelled' if result.cancelled else ''}</p>\n"
        + "\n".join(sections) + "\n</body></html>\n"
    )


def answers_path(path: Path, result: RunResult) -> Path:
    """``path``, or beside it for a partial run when ``path`` exists (only a complete run
    replaces an existing file)."""
    if result.complete or not path.exists():
        return path
    return path.with_name(f"{path.stem}-partial-{result.run_id or uuid.uuid4().hex[:8]}"
                          f"{path.suffix}")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` under a temporary name, then rename it into place; a
    failed write leaves ``path`` as it was and says why."""
    if not path.parent.is_dir():
        raise QgsProcessingException(f"The folder {path.parent} does not exist: choose another.")
    temp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        raise QgsProcessingException(
            f"The answers cannot be written to {path} ({exc.strerror or exc}): choose another "
            "folder or free some space.") from None
    finally:
        temp.unlink(missing_ok=True)
