"""Plain-data results of runtime requests (built from the child's JSON answers)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

T = TypeVar("T")


def from_reply(cls: type[T], reply: dict[str, Any]) -> T:
    """``cls`` from the child's reply, ignoring keys it does not know (newer children)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in reply.items() if k in names})


@dataclass
class RuntimeState:
    """Whether the runtime interpreter can run GeoChat's core (checked without starting it)."""

    ready: bool
    python: Optional[str]
    missing: list[str] = field(default_factory=list)  # import names it lacks
    message: str = ""


@dataclass
class PlanResult:
    """The tiles a request would run, for a preview: footprints as WKT in ``crs_wkt``."""

    tiles: int
    skipped: int  # tiles left out of the grid (outside the area of interest)
    footprints_wkt: list[str]
    crs_wkt: Optional[str]
    tile_size: int
    gsd_m: float  # ground metres per tile-image pixel
    message: str  # one sentence: how many tiles, or how the extent is shown to the model
    family: str = ""
    tiled: bool = True  # False: a question about one (overview) tile
    tile_ids: list[str] = field(default_factory=list)  # beside footprints_wkt, same order


@dataclass
class RunResult:
    """A finished, cancelled or failed run. ``output`` is the GeoPackage holding the merged
    detections of every finished tile (None when nothing was written)."""

    output: Optional[str]
    layer: str
    features: int
    tiles_done: int
    tiles_failed: int
    tiles_planned: int
    cancelled: bool = False
    error: Optional[str] = None  # why it stopped early; finished tiles are still in ``output``
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"tile", "message", "prompt"}
    answers: list[dict[str, Any]] = field(default_factory=list)  # per tile and prompt
    counts: dict[str, int] = field(default_factory=dict)  # label -> features
    crs_wkt: Optional[str] = None
    seconds: float = 0.0
    tiles_skipped: int = 0  # nodata tiles
    model: str = ""
    run_id: str = ""
    generated_tokens: int = 0
    crashed: bool = False  # the runtime process died mid-run (the output was recovered)
    note: str = ""  # where the finished tiles went when not to ``output.path`` (an existing
    # file is replaced only by a complete run: a partial one goes beside it), or why none

    @property
    def complete(self) -> bool:
        return not self.cancelled and self.error is None


@dataclass
class AskResult:
    """The answer to one question about an extent."""

    text: str  # the answer without markup
    user_text: str  # the user turn sent (with task markup): history is [user_text, raw]
    how: str  # which image the model looked at
    output: Optional[str]  # GeoPackage of the georeferenced boxes/masks, if any
    features: int
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    raw: str = ""
    layer: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    crs_wkt: Optional[str] = None
    problems: list[str] = field(default_factory=list)
    model: str = ""
