"""GeoPixel: prompts, and ``<p> phrase </p> [SEG]`` text paired in order with its mask stack."""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from ..errors import ParseError
from ..results import Answer, Detection, polygonal
from .base import CLIP_MEAN, CLIP_STD, Family, Preprocess, Task, TileSize, clean_text, finish_box
from .base import required

GROUNDING_PROMPT = (
    "Can you provide a thorough description of this image? Please output with interleaved "
    "segmentation masks for the corresponding phrases."
)
SEGMENT_PROMPT = "Could you provide a segmentation mask for {expression} in this image?"
# each [SEG] takes the next mask; the phrase right before it (no nested tags) names it
_SEG = re.compile(r"(?:<p>(?P<phrase>(?:(?!</?p>).)*?)</p>\s*)?\[SEG\]", re.DOTALL)
SIMPLIFY_PIXELS = 0.5


class GeoPixelFamily(Family):
    """GeoPixel-7B (InternLM-XComposer-2.5 + SAM-2): grounded descriptions with masks."""

    name = "geopixel"
    tasks = frozenset({Task.CHAT, Task.CAPTION, Task.GROUNDING, Task.SEGMENT})
    # IXC-2.5 cuts the image into 560 px sub-images itself (white padding at the bottom, CLIP
    # normalisation) and upscales a square under 1680 px to 1680 (3 x 3): 1680 px tiles are its
    # native input, and a tile cut by the raster's edge goes in unpadded (GeoPixel pads it)
    preprocess = Preprocess(
        size=3 * 560, pad_rgb=(255, 255, 255), mean=CLIP_MEAN, std=CLIP_STD, multiple_of=560,
        crop_padding=True,
    )
    template = None  # the model's own chat template, applied by its backend

    def _prompt(
        self, task: Task, text: str, region: Optional[BaseGeometry], classes: list[str],
        tile_size: Optional[TileSize],
    ) -> str:
        if task is Task.GROUNDING:
            return GROUNDING_PROMPT
        if task is Task.SEGMENT:
            return SEGMENT_PROMPT.format(expression=required(text, "what to segment"))
        return text or "Can you provide a thorough description of this image?"

    def _parse(
        self, answer: Answer, width: int, height: int, masks: Optional[np.ndarray],
        default_label: str,
    ) -> None:
        raw = answer.raw
        stack = _mask_stack(masks)
        pieces: list[str] = []
        position = 0
        count = 0
        for count, match in enumerate(_SEG.finditer(raw), start=1):
            pieces.append(raw[position : match.start()])
            position = match.end()
            phrase = " ".join((match.group("phrase") or "").split())
            pieces.append(phrase)
            if count > len(stack):
                continue
            geometry = mask_geometry(stack[count - 1], width, height)
            if geometry.is_empty:
                answer.problems.append(f"mask {count} ({phrase or default_label!r}) is empty")
                continue
            det = Detection(
                label=phrase or default_label,
                geometry=geometry,
                kind="mask",
                phrase=phrase,
                span=match.span(),
            )
            answer.detections.append(finish_box(det, width, height))
        pieces.append(raw[position:])
        answer.text = clean_text(pieces)
        if count != len(stack):
            answer.problems.append(
                f"{count} [SEG] in the text but {len(stack)} masks: "
                f"only the first {min(count, len(stack))} were paired"
            )


def _mask_stack(masks: Optional[np.ndarray]) -> np.ndarray:
    """Masks as an (n, H, W) array (a single 2-D mask counts as one); ParseError otherwise."""
    if masks is None:
        return np.zeros((0, 1, 1), dtype=bool)
    try:
        stack = np.asarray(masks)
    except (TypeError, ValueError) as exc:
        raise ParseError(f"masks are not an array: {exc}") from exc
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.dtype.kind not in "biuf" or 0 in stack.shape[1:]:
        raise ParseError(
            f"masks must be an (n, height, width) array of logits or booleans, got shape "
            f"{stack.shape} {stack.dtype}: save GeoPixel's pred_masks[0] with numpy.save"
        )
    return stack


def mask_geometry(mask: np.ndarray, width: int, height: int) -> BaseGeometry:
    """The (multi)polygon of ``mask > 0`` in tile pixels, holes kept, simplified to 0.5 px.

    A mask at another resolution than the tile (width x height) is scaled to the tile.
    """
    binary = np.nan_to_num(mask) > 0 if mask.dtype != bool else mask
    to_tile = Affine.scale(width / binary.shape[1], height / binary.shape[0])
    parts = [
        shape(geom)
        for geom, _ in features.shapes(
            binary.astype(np.uint8), mask=binary, transform=to_tile
        )
    ]
    if not parts:
        return shapely.Polygon()
    merged = shapely.union_all(parts).simplify(SIMPLIFY_PIXELS, preserve_topology=True)
    return merged if merged.is_valid else polygonal(shapely.make_valid(merged))
