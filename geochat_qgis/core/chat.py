"""A conversation about one extent: the image the model sees is one tile of it.

The extent goes to the model at native resolution when it fits one tile, otherwise as an overview
downsampled to one tile; :class:`ChatReply.how` says which. Earlier turns are kept (multi-turn, the
image with the first turn); a region (``[identify]``) drawn on the map in any CRS becomes the box
in the tile frame. The same extent gives the same tile pixels, so a backend that keeps what it
evaluated (llama.cpp) continues a follow-up from the earlier turn: it pays only the new turn;
a changed extent, model or history shares less and is evaluated from where it differs. The dock,
the ``ask`` command and Processing's describe use this one path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from shapely.geometry.base import BaseGeometry

from .backends.base import Backend, CancelToken, Conversation, GenerateOptions, TokenCallback, Turn
from .errors import GeoChatError
from .families import get_family
from .georef import map_to_tile, reproject_geometry, same_crs
from .results import Answer, georeference
from .tile_reading import iter_tiles, model_tile
from .tile_types import Tile, TilePlan, TileSpec
from .tiling import plan_tiles

REGION_MARGIN = 0.5  # an identify region's extent grows by this fraction of its size each side


@dataclass
class ChatRequest:
    """One question about ``extent`` (in ``extent_crs``; None = the whole raster)."""

    raster: str
    question: str
    task: str = "chat"
    family: str = "geochat"
    extent: Optional[tuple[float, float, float, float]] = None
    extent_crs: Optional[str] = None
    history: Sequence[tuple[str, str]] = ()  # earlier (user text, model answer) of this chat
    region: Optional[BaseGeometry] = None  # identify: the region, in ``region_crs``
    region_crs: Optional[str] = None  # None: extent_crs
    classes: Sequence[str] = ()
    tile_spec: Optional[TileSpec] = None  # None: the family's tile size
    output_crs: Optional[str] = None  # detections' CRS; None: the raster's
    max_new_tokens: int = 256
    temperature: float = 0.0
    family_settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatReply:
    user_text: str  # what was sent as the user turn (with task markup)
    answer: Answer  # text without markup; detections georeferenced into ``crs``
    crs: Optional[str]
    how: str  # which image the model looked at
    tile: Tile
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    #: prompt tokens the backend evaluated for this turn (less than ``prompt_tokens`` when it
    #: continued from what the conversation's earlier turn left evaluated)
    evaluated_tokens: int = 0


def overview_spec(raster: str, spec: TileSpec, extent=None, extent_crs: Optional[str] = None,
                  aoi: Any = None) -> tuple[TileSpec, str]:
    """A spec whose single tile covers the extent, and a sentence saying how.

    The extent fits one tile at native resolution, or is downsampled to one tile (a coarser GSD,
    read from overviews with average resampling). The dock, ``ask`` and Processing's describe
    share this rule.
    """
    spec = replace(spec, overlap=0.0)
    plan = plan_tiles(raster, spec, extent=extent, extent_crs=extent_crs, aoi=aoi)
    width, height = plan.area_window[2:]
    scale = plan.scale * max(width, height) / plan.window_px
    if len(plan) > 1 and scale > 1:
        gsd = plan.native_gsd_m * scale * (1 + 1e-9)
        return replace(spec, gsd=gsd), (
            f"an overview of the extent ({width} x {height} px) downsampled to one "
            f"{spec.tile_size} px tile at {gsd:.3g} m per pixel")
    return spec, f"one {spec.tile_size} px tile at {plan.native_gsd_m * plan.scale:.3g} m per pixel"


def overview_plan(raster: str, spec: TileSpec, extent=None, extent_crs: Optional[str] = None,
                  aoi: Any = None) -> tuple[TilePlan, str]:
    """A plan with exactly one tile covering the extent (see :func:`overview_spec`)."""
    spec, how = overview_spec(raster, spec, extent, extent_crs, aoi)
    plan = plan_tiles(raster, spec, extent=extent, extent_crs=extent_crs, aoi=aoi)
    if not plan.tiles:
        raise GeoChatError("the extent holds no raster pixels: choose an extent over the raster")
    return replace(plan, tiles=plan.tiles[:1]), how


def region_extent(region: BaseGeometry) -> tuple[float, float, float, float]:
    """The region's bounds grown by REGION_MARGIN, so the model sees its surroundings."""
    xmin, ymin, xmax, ymax = region.bounds
    dx = max(xmax - xmin, 1e-9) * REGION_MARGIN
    dy = max(ymax - ymin, 1e-9) * REGION_MARGIN
    return (xmin - dx, ymin - dy, xmax + dx, ymax + dy)


def ask(request: ChatRequest, backend: Backend, on_token: Optional[TokenCallback] = None,
        cancel: Optional[CancelToken] = None) -> ChatReply:
    """Ask ``request.question`` about its extent; raises GeoChatError (Cancelled when cancelled)."""
    started = time.perf_counter()
    family = get_family(request.family, **request.family_settings)
    preprocess = family.preprocess
    spec = request.tile_spec or TileSpec(tile_size=preprocess.size or 504)
    if preprocess.pad_rgb:
        spec = replace(spec, pad_rgb=preprocess.pad_rgb)
    region_crs = request.region_crs or request.extent_crs
    extent, extent_crs = request.extent, request.extent_crs
    if request.region is not None:
        extent, extent_crs = region_extent(request.region), region_crs
    plan, how = overview_plan(request.raster, spec, extent, extent_crs)
    tile = next(iter_tiles(plan), None)
    if tile is None:
        raise GeoChatError("the extent could not be read (nodata or unreadable blocks): "
                           "choose another extent")
    tile = model_tile(tile, preprocess.crop_padding)
    size = (tile.image.shape[1], tile.image.shape[0])
    region_px = None
    if request.region is not None:
        region = request.region
        if region_crs and plan.crs and not same_crs(region_crs, plan.crs):
            region = reproject_geometry(region, region_crs, plan.crs)
        region_px = map_to_tile(tile, region)
    user_text = family.build_prompt(request.task, request.question, region=region_px,
                                    classes=request.classes, tile_size=size)
    turns = [Turn(*_turn(index, item)) for index, item in enumerate(request.history)]
    turns.append(Turn(user_text))
    options = GenerateOptions(max_new_tokens=request.max_new_tokens,
                              temperature=request.temperature,
                              stop=getattr(family, "stop", ()), on_token=on_token, cancel=cancel)
    backend.load()
    generation = backend.generate([tile.image], Conversation(turns, family.name), options)[0]
    answer = family.parse(generation.text, size, generation.masks,
                          default_label=request.question or request.task)
    answer.detections = georeference(answer.detections, tile, request.output_crs)
    for detection in answer.detections:
        detection.attributes.update(task=request.task, prompt=request.question,
                                    model=backend.describe(), raster=str(request.raster))
    evaluated = generation.extra.get("evaluated_tokens", generation.prompt_tokens)
    return ChatReply(user_text, answer, request.output_crs or plan.crs, how, tile,
                     time.perf_counter() - started, generation.prompt_tokens,
                     generation.generated_tokens, evaluated)


def _turn(index: int, item: Any) -> tuple[str, str]:
    """History item ``index`` as (user text, answer); GeoChatError when it is not one."""
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2 \
            or not all(isinstance(text, str) for text in item):
        raise GeoChatError(f"history item {index + 1} is {item!r}, not [question, answer] "
                           "(two texts): send the conversation as pairs, or start a new one")
    return item[0], item[1]


def as_history(replies: Sequence[ChatReply]) -> list[tuple[str, str]]:
    """Earlier replies as ``ChatRequest.history`` (the raw answer, as the model wrote it)."""
    return [(reply.user_text, reply.answer.raw) for reply in replies]
