"""What every model family provides: tasks, prompts, preprocessing and an output parser."""
from __future__ import annotations

import abc
import enum
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from shapely.geometry import box as shapely_box
from shapely.geometry.base import BaseGeometry

from ..errors import GeoChatError, ParseError
from ..results import Answer, Detection

# A tile's size in pixels: one side of a square tile, or (width, height).
TileSize = Union[int, tuple[int, int]]

# OpenAI CLIP's normalisation, used by GeoChat (CLIP-336) and GeoPixel (IXC's CLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# tags that carry no text: phrase tags left unpaired, GeoPixel's [SEG], GeoChat's box separator
# <delim> (its demo splits boxes on it), the end-of-sequence token
_STRAY_MARKUP = re.compile(r"</?p>|<p\s*\Z|\[SEG\]|<delim>|</s>")


def clean_text(pieces: Sequence[str]) -> str:
    """Join the text left between markup, dropping stray tags and tidying the spaces left over."""
    text = _STRAY_MARKUP.sub("", "".join(pieces))
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([.,;:!?])", r"\1", text)
    return "\n".join(line.strip() for line in text.strip().splitlines())


class Task(str, enum.Enum):
    """What the user asks a model to do; each family supports a subset."""

    CHAT = "chat"
    CAPTION = "caption"
    VQA = "vqa"
    CLASSIFY = "classify"
    REFER = "refer"  # referring detection: boxes for a phrase
    GROUNDING = "grounding"  # grounded description: text with boxes or masks
    IDENTIFY = "identify"  # region caption: what is in this region
    SEGMENT = "segment"  # referring segmentation: a mask for a phrase


@dataclass(frozen=True)
class Preprocess:
    """How a family expects its image: square side, pad colour, normalisation.

    ``size`` is the tile side to feed it (what tiling uses by default; None: any size);
    ``pad_rgb`` the fill when padding a tile to square (None: no padding, any aspect ratio);
    ``multiple_of`` the step of sizes the model resizes to itself (Qwen2.5-VL: 28);
    ``crop_padding``: a tile cut by the raster's edge goes in as its raster pixels only (the model
    pads itself), not padded to a square.
    """

    size: Optional[int]
    pad_rgb: Optional[tuple[int, int, int]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    multiple_of: Optional[int] = None
    crop_padding: bool = False


def tile_dims(tile_size: TileSize) -> tuple[int, int]:
    """(width, height) of a tile given as one side or as (width, height); ParseError if not > 0."""
    sides = tile_size if isinstance(tile_size, (tuple, list)) else (tile_size, tile_size)
    if len(sides) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in sides
    ):
        raise ParseError(f"tile size {tile_size!r} is not a number of pixels or (width, height)")
    width, height = int(sides[0]), int(sides[1])
    if width <= 0 or height <= 0:
        raise ParseError(f"tile size {tile_size!r} must be positive: pass the tile's pixel size")
    return width, height


def finish_box(det: Detection, width: int, height: int) -> Detection:
    """Fill ``bbox`` and ``margin`` (pixels from the bbox to the nearest tile edge, 0 when cut)."""
    x1, y1, x2, y2 = det.bbox if det.bbox is not None else det.geometry.bounds
    det.bbox = (float(x1), float(y1), float(x2), float(y2))
    det.margin = float(max(0.0, min(x1, y1, width - x2, height - y2)))
    return det


def clip_box(
    values: Sequence[float], width: float, height: float, min_size: float = 0.0
) -> tuple[tuple[float, float, float, float], list[str]]:
    """Order and clip a box (x1, y1, x2, y2) to [0, width] x [0, height]; flags what changed.

    A side shorter than ``min_size`` (the model's coordinate step: a box that rounded to zero
    width) is widened to it about its centre, inside the tile, so every box is a valid polygon.
    A box wholly outside the frame is flagged "outside" (parsers drop it).
    """
    x1, y1, x2, y2 = (float(v) for v in values)
    flags: list[str] = []
    if x1 > x2 or y1 > y2:
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        flags.append("reordered")
    clipped = (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )
    if clipped != (x1, y1, x2, y2):
        flags.append("clipped")
        if (clipped[0] == clipped[2] and x1 < x2) or (clipped[1] == clipped[3] and y1 < y2):
            flags.append("outside")
    (x1, x2), widened_x = _widen(clipped[0], clipped[2], width, min_size)
    (y1, y2), widened_y = _widen(clipped[1], clipped[3], height, min_size)
    if widened_x or widened_y:
        flags.append("widened")
    return (x1, y1, x2, y2), flags


def _widen(low: float, high: float, limit: float, size: float) -> tuple[tuple[float, float], bool]:
    """[low, high] grown to ``size`` about its centre and kept within [0, limit]."""
    if high - low >= size:
        return (low, high), False
    size = min(size, limit)
    low = min(max((low + high - size) / 2.0, 0.0), limit - size)
    return (low, low + size), True


def box_polygon(bbox: Sequence[float]) -> BaseGeometry:
    """The axis-aligned rectangle of ``bbox`` as a polygon."""
    return shapely_box(*bbox)


class Family(abc.ABC):
    """A model family: its tasks, prompt text, image preprocessing and output parser."""

    name: str = ""
    tasks: frozenset[Task] = frozenset()
    preprocess: Preprocess

    def task(self, task: Union[Task, str]) -> Task:
        """``task`` as a Task this family supports, or a GeoChatError naming the ones it does."""
        try:
            value = Task(task)
        except ValueError:
            value = None
        if value is None or value not in self.tasks:
            supported = ", ".join(sorted(t.value for t in self.tasks))
            raise GeoChatError(
                f"{self.name} cannot do the task {task!r}: choose one of {supported}"
            )
        return value

    def build_prompt(
        self,
        task: Union[Task, str],
        text: str = "",
        region: Optional[BaseGeometry] = None,
        classes: Optional[Sequence[str]] = None,
        tile_size: Optional[TileSize] = None,
    ) -> str:
        """The user-turn text for ``task``.

        ``region`` (identify) is a polygon in tile pixels (x right, y down) of a tile of
        ``tile_size``; ``classes`` (classify) the class names to choose from. Raises GeoChatError
        for a task the family cannot do or a missing input.
        """
        names = [" ".join(str(c).split()) for c in classes or ()]
        return self._prompt(self.task(task), (text or "").strip(), region, names, tile_size)

    def parse(
        self,
        raw: str,
        tile_size: TileSize,
        masks: Optional[np.ndarray] = None,
        *,
        default_label: str = "object",
    ) -> Answer:
        """Typed results from the model's raw text (and masks), geometry in tile pixels.

        Never raises anything but ParseError; parts it cannot read go to ``Answer.problems``.
        ``default_label`` names detections the text gives no phrase for (a bare referring box).
        """
        if not isinstance(raw, str):
            raise ParseError(f"model output must be text, got {type(raw).__name__}")
        width, height = tile_dims(tile_size)
        answer = Answer(text="", raw=raw)
        self._parse(answer, width, height, masks, default_label)
        return answer

    @abc.abstractmethod
    def _prompt(
        self, task: Task, text: str, region: Optional[BaseGeometry], classes: list[str],
        tile_size: Optional[TileSize],
    ) -> str:
        """``build_prompt`` for a task this family supports, ``text`` stripped."""

    @abc.abstractmethod
    def _parse(
        self, answer: Answer, width: int, height: int, masks: Optional[np.ndarray],
        default_label: str,
    ) -> None:
        """Fill ``answer`` (its ``raw`` set) for a tile of width x height pixels."""


def required(text: str, what: str) -> str:
    """``text``, or a GeoChatError asking the user to type ``what``."""
    if not text:
        raise GeoChatError(f"this task needs {what}: type it in the prompt")
    return text


def region_required(region: Optional[BaseGeometry], tile_size: Optional[TileSize]) -> TileSize:
    """The tile size, or a GeoChatError when a region caption lacks its region or tile."""
    if region is None or tile_size is None or region.is_empty:
        raise GeoChatError("a region caption needs a region inside the tile: draw one on the map")
    return tile_size
