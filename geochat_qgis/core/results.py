"""Typed results: what a model said (Answer) and what it found (Detection)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, Optional, Sequence

import numpy as np
import shapely
from shapely.geometry import GeometryCollection
from shapely.geometry.base import BaseGeometry

from .errors import RasterError
from .georef import tile_to_crs, tile_to_map
from .tile_types import Tile


@dataclass(slots=True)
class Detection:
    """One object a model found (slots: a run holds ~100k of them; memory and speed).

    ``geometry`` is in the frame named by ``frame``: ``"tile"`` pixels (x right, y down) straight
    from a parser, then after :func:`georeference` ``"raster"`` (the raster's CRS) or ``"crs"``
    (a requested CRS), named by ``crs``. ``bbox``, ``span`` and ``margin`` stay in the tile
    frame of the model's answer.
    """

    label: str
    geometry: BaseGeometry
    kind: str = "box"  # "box" (axis-aligned), "obox" (oriented box polygon), "mask"
    phrase: str = ""
    span: Optional[tuple[int, int]] = None  # character span of the phrase/box in the raw text
    bbox: Optional[tuple[float, float, float, float]] = None  # axis-aligned, tile pixels
    angle: Optional[float] = None
    score: Optional[float] = None
    # pixels from the bbox to the nearest edge of its tile (0: cut by the edge); merge prefers
    # the detection seen furthest from a tile edge when models give no score
    margin: Optional[float] = None
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


def geometry_array(detections: Sequence[Detection]) -> np.ndarray:
    """The detections' geometries as a numpy object array, for shapely's vectorised functions.

    (``np.fromiter``: ``np.array`` inspects every geometry and is ~50x slower at 100k.)
    """
    return np.fromiter(map(attrgetter("geometry"), detections), dtype=object,
                       count=len(detections))


def polygonal(geom: BaseGeometry) -> BaseGeometry:
    """``geom`` if it is a (multi)polygon, else the multipolygon of its polygon parts."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = shapely.get_parts(shapely.get_parts(geom))
    return shapely.MultiPolygon([p for p in parts if p.geom_type == "Polygon"])


def georeference(
    detections: Sequence[Detection], tile: Tile, dst_crs: Optional[str] = None,
    dropped: Optional[list[str]] = None,
) -> list[Detection]:
    """Copies of tile-pixel ``detections`` in the raster CRS, or in ``dst_crs`` when given.

    Uses the tiling core's transforms (georef.py): the tile's affine is applied exactly (oriented
    boxes stay exact polygons); reprojection densifies edges longer than 1/32 of the tile's
    detections' extent. Each copy gets the tile's id, its frame ("raster" or "crs") and CRS.
    A detection that does not exist in ``dst_crs`` (off a geostationary disc) is left out and
    said in ``dropped`` when it is given (else the RasterError is raised).
    """
    if not detections:
        return []
    stray = [d.frame for d in detections if d.frame != "tile"]
    if stray:
        raise ValueError(f"georeference needs tile-pixel detections, got frame {stray[0]!r}")
    together = GeometryCollection([d.geometry for d in detections])
    if dst_crs is None:
        moved, frame, crs = tile_to_map(tile, together), "raster", tile.crs
    else:
        frame, crs = "crs", dst_crs
        try:
            moved = tile_to_crs(tile, together, dst_crs)
        except RasterError as exc:
            if dropped is None or tile.crs is None:
                raise
            kept, geoms = [], []
            for det in detections:  # one by one: keep every box that does exist there
                try:
                    geoms.append(tile_to_crs(tile, det.geometry, dst_crs))
                    kept.append(det)
                except RasterError:
                    dropped.append(f"box {det.label!r} of tile {tile.tile_id} left out: {exc}")
            detections, moved = kept, GeometryCollection(geoms)
    return [
        replace(
            det,
            geometry=geometry,
            frame=frame,
            crs=crs,
            tile_id=tile.tile_id,
            flags=list(det.flags),
            attributes=dict(det.attributes),
        )
        for det, geometry in zip(detections, moved.geoms)
    ]
