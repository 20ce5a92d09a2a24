"""Qwen2.5-VL: prompts, and ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` JSON answers.

Boxes are absolute pixels of the model's resized input. Qwen2.5-VL resizes each side to a
multiple of 28 (its pixel-count limits aside), so a tile sized to a multiple of 28 maps 1:1;
other tiles are scaled back from the rounded size.
"""
from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any, Iterator, Optional, Union

import numpy as np
from shapely.geometry.base import BaseGeometry

from ..results import Answer, Detection
from .base import CLIP_MEAN, CLIP_STD, Family, Preprocess, Task, TileSize, box_polygon
from .base import clean_text, clip_box, finish_box, region_required, required, tile_dims

PATCH = 28
# where a JSON object or list of objects may start
_JSON_START = re.compile(r"\{\s*\"|\[\s*\{")
_FALLBACK = re.compile(r"\"bbox_2d\"\s*:\s*\[([^\[\]]*)\]")
_LABEL = re.compile(r"\"label\"\s*:\s*\"((?:[^\"\\]|\\.)*)\"")
_EMPTY_FENCE = re.compile(r"```[a-zA-Z]*\s*```")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def input_dims(width: int, height: int) -> tuple[int, int]:
    """The size Qwen2.5-VL resizes a (width x height) image to: each side to a multiple of 28."""
    return max(PATCH, round(width / PATCH) * PATCH), max(PATCH, round(height / PATCH) * PATCH)


class QwenFamily(Family):
    """Qwen2.5-VL 3B/7B (GGUF via llama.cpp's Qwen25VLChatHandler, or transformers)."""

    name = "qwen2.5-vl"
    tasks = frozenset(Task) - {Task.SEGMENT}
    # grounding needs >= 1024 image tokens (models.md): 32 x 32 patches of 28 px = 896 px tiles
    preprocess = Preprocess(
        size=32 * PATCH, pad_rgb=None, mean=CLIP_MEAN, std=CLIP_STD, multiple_of=PATCH
    )
    template = None  # the model's own chat template, applied by its backend

    def _prompt(
        self, task: Task, text: str, region: Optional[BaseGeometry], classes: list[str],
        tile_size: Optional[TileSize],
    ) -> str:
        names = ", ".join(classes)
        if task in (Task.CHAT, Task.CAPTION):
            return text or "Describe this image in detail."
        if task is Task.VQA:
            return f"{required(text, 'a question')}\nAnswer the question using a single word or phrase."
        if task is Task.CLASSIFY:
            question = text or "What kind of scene does this image show?"
            choose = f" Choose one of: {names}." if names else ""
            return f"{question}{choose} Answer with the class name only."
        if task is Task.REFER:
            what = required(text, "what to find")
            return f"Locate {what} in the image, output its bbox coordinates using JSON format."
        if task is Task.GROUNDING:
            what = text or names or "object"
            return (
                f"Locate every {what} in the image and output the bbox coordinates and labels "
                "in JSON format."
            )
        width, height = tile_dims(region_required(region, tile_size))
        in_w, in_h = input_dims(width, height)
        x1, y1, x2, y2 = region.bounds
        values = [round(x1 * in_w / width), round(y1 * in_h / height)]
        values += [round(x2 * in_w / width), round(y2 * in_h / height)]
        return f"{text or 'What is the object in the region'} {values}? Answer briefly."

    def _parse(
        self, answer: Answer, width: int, height: int, masks: Optional[np.ndarray],
        default_label: str,
    ) -> None:
        raw = answer.raw
        in_w, in_h = input_dims(width, height)
        scale = (width / in_w, height / in_h)
        spans: list[tuple[int, int]] = []
        for (start, end), items in _json_values(raw):
            spans.append((start, end))
            for item in items:
                self._add(answer, item.get("bbox_2d"), item.get("label"), (start, end),
                          scale, width, height, default_label)
        for match in _FALLBACK.finditer(raw):
            if any(s <= match.start() < e for s, e in spans):
                continue
            start = raw.rfind("{", 0, match.start())
            start = match.start() if start < 0 else start
            close = raw.find("}", match.end())
            end = len(raw) if close < 0 else close + 1
            label = _LABEL.search(raw, start, end)
            numbers = [_number(n) for n in _NUMBER.findall(match.group(1))]
            answer.problems.append(
                f"malformed JSON around {raw[start:end][:80]!r}: box read by pattern"
            )
            spans.append((start, end))
            self._add(answer, numbers, label.group(1) if label else None, (start, end),
                      scale, width, height, default_label)
        pieces, position = [], 0
        for start, end in sorted(spans):
            pieces.append(raw[position:max(start, position)])
            position = max(position, end)
        pieces.append(raw[position:])
        answer.text = clean_text([_EMPTY_FENCE.sub("", "".join(pieces))])

    @staticmethod
    def _add(
        answer: Answer,
        bbox: Any,
        label: Any,
        span: tuple[int, int],
        scale: tuple[float, float],
        width: int,
        height: int,
        default_label: str,
    ) -> None:
        """Append one detection from a ``bbox_2d`` value, or a problem if it is not 4 numbers."""
        numbers_ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
            _finite(v) for v in bbox
        )
        if not numbers_ok:
            answer.problems.append(f"bbox_2d {reprlib.repr(bbox)} is not four numbers: skipped")
            return
        corners = [v * scale[i % 2] for i, v in enumerate(bbox)]
        box, flags = clip_box(corners, width, height, min_size=max(scale))
        name = " ".join(str(label).split()) if label not in (None, "") else ""
        name = name.encode("utf-8", "replace").decode("utf-8")  # JSON may escape lone surrogates
        if "outside" in flags:
            answer.problems.append(f"bbox_2d {list(bbox)} lies outside the {width}x{height} tile")
            return
        if "clipped" in flags:
            answer.problems.append(f"bbox_2d {list(bbox)} outside the {width}x{height} tile: clipped")
        det = Detection(
            label=name or default_label,
            geometry=box_polygon(box),
            phrase=name,
            span=span,
            bbox=box,
            flags=flags,
        )
        answer.detections.append(finish_box(det, width, height))


def _json_values(raw: str) -> Iterator[tuple[tuple[int, int], list[dict]]]:
    """(span, objects with a ``bbox_2d``) for each JSON value in ``raw`` that holds any."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        match = _JSON_START.search(raw, position)
        if match is None:
            return
        try:
            value, end = decoder.raw_decode(raw, match.start())
        except (ValueError, RecursionError):
            position = match.start() + 1
            continue
        items = [v for v in _walk(value) if "bbox_2d" in v]
        if items:
            yield (match.start(), end), items
        position = end


def _walk(value: Any) -> Iterator[dict]:
    """Every dict in a decoded JSON value, in document order."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def _number(text: str) -> Union[int, float]:
    """A JSON number's value (ints stay ints; one too long for Python's int conversion limit
    becomes an infinite float, refused later as not finite)."""
    if any(c in text for c in ".eE"):
        return float(text)
    try:
        return int(text)
    except ValueError:  # over sys.get_int_max_str_digits() digits
        return math.copysign(math.inf, -1.0 if text.startswith("-") else 1.0)


def _finite(value: Any) -> bool:
    """A real number (not a bool) that fits a float and is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
