"""GeoChat: task prompts, its ``{<x1><y1><x2><y2>|<θ>}`` box grammar, and a tolerant parser.

Boxes are integers 0-100 relative to the square (padded) input image. The angle θ is unverified
(models.md): ``angle_convention`` says how to read it. ``"none"`` (default) keeps the axis-aligned
box as the geometry and records θ as an attribute; ``"ccw"`` / ``"cw"`` rotate the box about its
centre by θ degrees counter-clockwise / clockwise as seen on screen (y down), giving an oriented
box polygon; ``"ccw"`` is how GeoChat's demo draws boxes (``cv2.getRotationMatrix2D(centre, θ)``),
``"cw"`` how TEOChat's converter reads them. The axis-aligned box is always in
``Detection.bbox``.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry.base import BaseGeometry

from ..errors import GeoChatError
from ..results import Answer, Detection
from .base import (
    CLIP_MEAN,
    CLIP_STD,
    Family,
    Preprocess,
    Task,
    TileSize,
    box_polygon,
    clean_text,
    clip_box,
    finish_box,
    region_required,
    required,
    tile_dims,
)
from .llava_v1 import EOS, llava_v1_prompt

ANGLE_CONVENTIONS = ("none", "ccw", "cw")
# shapely rotates counter-clockwise in a y-up frame, i.e. clockwise on screen in pixel space
_SHAPELY_SIGN = {"ccw": -1.0, "cw": 1.0}

_NUM = r"<\s*(-?\d+(?:\.\d+)?)\s*>"
_BOX = rf"\{{\s*{_NUM}\s*{_NUM}\s*{_NUM}\s*{_NUM}\s*(?:\|\s*{_NUM}\s*)?\}}"
_BOX_RE = re.compile(_BOX)
# in order: a phrase (no nested tags), a box, a malformed box, a box cut off at the end
_TOKENS = re.compile(
    r"(?P<phrase><p>(?P<ptext>(?:(?!</?p>).)*?)</p>)"
    rf"|(?P<box>{_BOX})"
    r"|(?P<bad>\{[^{}<]*<[^{}]*\})"  # [^{}<]: one way to match, so linear on "{<<<<..."
    r"|(?P<cut>\{\s*(?:<[^{}]*)?\Z)",
    re.DOTALL,
)
_NUMBERS = re.compile(_NUM)

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
CLASSIFY_SUFFIX = (
    "\nClassify the image from the following classes. Answer in one word or a short phrase."
)
CAPTION_QUESTION = "Describe the image in detail."


class GeoChatFamily(Family):
    """GeoChat-7B (LLaVA-1.5, 504 px, CLIP normalisation, ``llava_v1`` template)."""

    name = "geochat"
    tasks = frozenset(Task) - {Task.SEGMENT}
    preprocess = Preprocess(size=504, pad_rgb=(122, 116, 104), mean=CLIP_MEAN, std=CLIP_STD)
    template = staticmethod(llava_v1_prompt)
    stop = (EOS,)

    def __init__(self, angle_convention: str = "none") -> None:
        if angle_convention not in ANGLE_CONVENTIONS:
            raise GeoChatError(
                f"unknown GeoChat angle convention {angle_convention!r}: "
                f"use one of {', '.join(ANGLE_CONVENTIONS)}"
            )
        self.angle_convention = angle_convention

    # prompts -----------------------------------------------------------------------------
    def _prompt(
        self, task: Task, text: str, region: Optional[BaseGeometry], classes: list[str],
        tile_size: Optional[TileSize],
    ) -> str:
        if task in (Task.CHAT, Task.CAPTION):
            return text or CAPTION_QUESTION
        if task is Task.VQA:
            return f"{required(text, 'a question')}{VQA_SUFFIX}"
        if task is Task.CLASSIFY:
            question = text or "Classify the image in the following classes:"
            if classes:
                question = f"{question} {', '.join(classes)}."
            return f"{question}{CLASSIFY_SUFFIX}"
        if task is Task.REFER:
            return f"[refer] Give me the location of <p> {required(text, 'what to find')} </p>"
        if task is Task.GROUNDING:
            return f"[grounding]{text or CAPTION_QUESTION}"
        where = self.region_box(region, region_required(region, tile_size))
        return f"[identify] {text or 'What is the object present at'} {where}"

    def region_box(self, region: BaseGeometry, tile_size: TileSize) -> str:
        """``{<x1><y1><x2><y2>|<θ>}`` for a region given in tile pixels (minimum rotated rectangle).

        With the ``none`` convention the region's axis-aligned envelope and θ = 0 are written.
        """
        width, height = tile_dims(tile_size)
        side = max(width, height)
        off_x, off_y = (side - width) / 2.0, (side - height) / 2.0
        if self.angle_convention == "none":
            x1, y1, x2, y2 = region.bounds
            theta = 0.0
        else:
            (cx, cy), w, h, theta = _rotated_rect(region, _SHAPELY_SIGN[self.angle_convention])
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        values = [
            min(max(round((v + off) / side * 100), 0), 100)
            for v, off in ((x1, off_x), (y1, off_y), (x2, off_x), (y2, off_y))
        ]
        return "{" + "".join(f"<{v}>" for v in values) + f"|<{round(theta)}>" + "}"

    # parsing -----------------------------------------------------------------------------
    def _parse(
        self, answer: Answer, width: int, height: int, masks: Optional[np.ndarray],
        default_label: str,
    ) -> None:
        raw = answer.raw
        pieces: list[str] = []
        phrase = ""
        position = 0
        for match in _TOKENS.finditer(raw):
            pieces.append(raw[position : match.start()])
            position = match.end()
            if match.group("phrase") is not None:
                phrase = " ".join(match.group("ptext").split())
                pieces.append(phrase)
                continue
            flag = ""
            if match.group("box") is not None:
                numbers = list(_BOX_RE.fullmatch(match.group("box")).groups())  # x1 y1 x2 y2 θ
            else:  # malformed, or cut off mid-box: keep it if its four corners are readable
                bad = match.group("bad") is not None
                found = _NUMBERS.findall(match.group("bad" if bad else "cut"))
                if len(found) < 4:
                    what = "unreadable box" if bad else "output cut off mid-box"
                    answer.problems.append(f"{what} {_quote(match.group(0))} skipped")
                    continue
                # a cut angle may have lost digits; a malformed one is not trusted either
                numbers, flag = found[:4] + [None], "malformed" if bad else "truncated"
                answer.problems.append(
                    f"{'malformed' if bad else 'cut off'} box {_quote(match.group(0))}: "
                    "corners read, angle unknown"
                )
            det = self._detection(
                numbers, phrase or default_label, phrase, match.span(), width, height
            )
            if "outside" in det.flags:
                answer.problems.append(f"box {_quote(match.group(0))} lies outside the tile")
                continue
            if flag:
                det.flags.append(flag)
            if "bad_angle" in det.flags:
                answer.problems.append(f"box {_quote(match.group(0))}: angle too large to read")
            if "clipped" in det.flags:
                answer.problems.append(f"box {_quote(match.group(0))} outside 0-100: clipped")
            answer.detections.append(det)
        pieces.append(raw[position:])
        answer.text = clean_text(pieces)

    def _detection(
        self,
        numbers: Sequence[Optional[str]],
        label: str,
        phrase: str,
        span: tuple[int, int],
        width: int,
        height: int,
    ) -> Detection:
        """A detection from the box numbers (0-100 of the padded square) in tile pixels."""
        side = max(width, height)
        off_x, off_y = (side - width) / 2.0, (side - height) / 2.0
        relative, flags = clip_box([float(v) for v in numbers[:4]], 100.0, 100.0)
        corners = [
            v * side / 100.0 - off
            for v, off in zip(relative, (off_x, off_y, off_x, off_y))
        ]
        bbox, tile_flags = clip_box(corners, width, height, min_size=side / 100.0)
        flags += [f for f in tile_flags if f not in flags]
        angle = float(numbers[4]) if numbers[4] is not None else None
        if angle is not None and not math.isfinite(angle):  # hundreds of digits: no angle
            angle = None
            flags.append("bad_angle")
        geometry = box_polygon(bbox)
        kind = "box"
        if angle is not None and self.angle_convention != "none":
            geometry = affinity.rotate(
                geometry, _SHAPELY_SIGN[self.angle_convention] * angle, origin="centroid"
            )
            kind = "obox"
        det = Detection(
            label=label,
            geometry=geometry,
            kind=kind,
            phrase=phrase,
            span=span,
            bbox=bbox,
            angle=angle,
            flags=flags,
        )
        return finish_box(det, width, height)


def _quote(text: str, limit: int = 60) -> str:
    """``text`` quoted for a problem message, cut to ``limit`` characters."""
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _rotated_rect(
    region: BaseGeometry, sign: float
) -> tuple[tuple[float, float], float, float, float]:
    """Centre, width, height and θ in [0, 90) of the region's minimum rotated rectangle.

    θ is such that rotating the axis-aligned (width x height) box about its centre by
    ``sign * θ`` degrees in shapely's sense gives the rectangle.
    """
    rect = shapely.oriented_envelope(region)
    centre = rect.centroid
    coords = np.asarray(rect.exterior.coords) if rect.geom_type == "Polygon" else None
    if coords is None or len(coords) < 4:  # a point or a line: no orientation to speak of
        x1, y1, x2, y2 = region.bounds
        return ((x1 + x2) / 2, (y1 + y2) / 2), x2 - x1, y2 - y1, 0.0
    edge_a, edge_b = coords[1] - coords[0], coords[2] - coords[1]
    w, h = float(np.hypot(*edge_a)), float(np.hypot(*edge_b))
    theta = math.degrees(math.atan2(edge_a[1], edge_a[0])) * sign % 180.0
    if theta >= 90.0:
        theta -= 90.0
        w, h = h, w
    return (centre.x, centre.y), w, h, theta
