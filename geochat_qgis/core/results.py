"""Typed results: what a model said (Answer) and what it found (Detection)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from shapely.geometry.base import BaseGeometry


@dataclass
class Detection:
    """One object a model found.

    ``geometry`` is in the frame named by ``frame``: ``"tile"`` pixels (x right, y down) straight
    from a parser, then ``"raster"`` map coordinates or a target CRS after georeferencing.
    """

    label: str
    geometry: BaseGeometry
    kind: str = "box"  # "box" (axis-aligned), "obox" (oriented box polygon), "mask"
    phrase: str = ""
    span: Optional[tuple[int, int]] = None  # character span of the phrase/box in the raw text
    bbox: Optional[tuple[float, float, float, float]] = None  # axis-aligned, tile pixels
    angle: Optional[float] = None
    score: Optional[float] = None
    flags: list[str] = field(default_factory=list)  # e.g. "clipped", "truncated"
    tile_id: str = ""
    frame: str = "tile"
    crs: Optional[str] = None  # WKT or authority string once georeferenced
    attributes: dict[str, Any] = field(default_factory=dict)  # provenance: task, prompt, model...


@dataclass
class Answer:
    """A parsed model answer: clean text plus detections and any parse problems."""

    text: str
    detections: list[Detection] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    raw: str = ""
