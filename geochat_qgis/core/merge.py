"""Merging detections from overlapping tiles into one set of features.

Boxes (axis-aligned or oriented) go through non-maximum suppression per label: two boxes of the
same label whose polygons overlap with IoU above the threshold are the same object, and only the
better one stays. Masks of the same phrase whose pieces overlap or meet across a tile border are
unioned into one feature.

"Better" is deterministic, because GeoChat gives no scores. Detections are ranked by
1. score, highest first (a detection without one ranks below any with one);
2. margin, largest first: the pixels between the box and its tile's nearest edge. A box cut by a
   tile border (margin 0) loses to the neighbouring tile's full view of the same object;
3. area, largest first (a box seen whole is larger than a cut one);
4. tile id, then position in the model's text, then input order.
Labels compare case- and space-insensitively.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import shapely

from .errors import GeoChatError
from .georef import same_crs
from .results import Detection, geometry_array

DEFAULT_IOU = 0.5
IOU_EPS = 1e-9
# masks closer than this fraction of their largest coordinate meet (float noise between tiles)
RELATIVE_TOUCH = 1e-9


def merge_detections(
    detections: Sequence[Detection],
    iou_threshold: float = DEFAULT_IOU,
    touch_distance: Optional[float] = None,
) -> list[Detection]:
    """Boxes after per-label NMS, then masks after stitching, best first within each.

    All detections must share one frame and CRS (georeference them first). ``touch_distance``
    (in the detections' units) is how close two mask pieces must be to count as meeting; by
    default float noise only (1e-9 of the largest coordinate).
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise GeoChatError(f"IoU threshold {iou_threshold} must be between 0 and 1")
    _check_one_frame(detections)
    boxes = [d for d in detections if d.kind != "mask"]
    masks = [d for d in detections if d.kind == "mask"]
    return suppress_boxes(boxes, iou_threshold) + stitch_masks(masks, touch_distance)


def rank(detections: Sequence[Detection]) -> list[int]:
    """Indices of ``detections`` best first (see the module docstring)."""
    areas = shapely.area(geometry_array(detections))

    def key(i: int) -> tuple:
        det = detections[i]
        return (
            -det.score if det.score is not None else np.inf,
            -det.margin if det.margin is not None else np.inf,
            -areas[i],
            det.tile_id,
            det.span[0] if det.span else -1,
            i,
        )

    return sorted(range(len(detections)), key=key)


def suppress_boxes(detections: Sequence[Detection], iou_threshold: float) -> list[Detection]:
    """Non-maximum suppression per label on the detections' polygons (STRtree + vectorised IoU)."""
    if not detections:
        return []
    order = rank(detections)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    geoms = geometry_array(detections)
    codes = _label_codes(detections)
    # envelope overlaps only: pairs of other labels are dropped before any exact geometry work
    left, right = shapely.STRtree(geoms).query(geoms)
    same = (codes[left] == codes[right]) & (position[left] < position[right])
    better, worse = left[same], right[same]
    areas = shapely.area(geoms)
    # an upper bound first (overlap <= envelope overlap and <= the smaller area): exact
    # intersections only for pairs that could pass the threshold
    bounds = shapely.bounds(geoms)
    lo = np.maximum(bounds[better, :2], bounds[worse, :2])
    hi = np.minimum(bounds[better, 2:], bounds[worse, 2:])
    bound = np.minimum(np.prod(np.clip(hi - lo, 0, None), axis=1),
                       np.minimum(areas[better], areas[worse]))
    maybe = _iou(bound, areas[better], areas[worse]) >= iou_threshold - IOU_EPS
    maybe |= areas[better] + areas[worse] <= 0  # zero-area boxes: duplicates only when equal
    better, worse = better[maybe], worse[maybe]
    inter = shapely.area(shapely.intersection(geoms[better], geoms[worse]))
    iou = _iou(inter, areas[better], areas[worse])
    degenerate = areas[better] + areas[worse] - inter <= 0
    iou[degenerate] = shapely.equals(geoms[better[degenerate]], geoms[worse[degenerate]])
    # threshold 1: only exact duplicates, which float areas put within IOU_EPS of 1
    hit = iou > iou_threshold if iou_threshold < 1.0 else iou >= 1.0 - IOU_EPS
    better, worse = better[hit], worse[hit]
    suppressed = np.zeros(len(detections), dtype=bool)
    # a pair's better one is decided before it acts: pairs run in the order of their better one
    by_better = np.argsort(position[better], kind="stable")
    for b, w in zip(better[by_better].tolist(), worse[by_better].tolist()):
        if not suppressed[b]:
            suppressed[w] = True
    return [detections[i] for i in order if not suppressed[i]]


def stitch_masks(
    detections: Sequence[Detection], touch_distance: Optional[float] = None
) -> list[Detection]:
    """Union the mask pieces of one phrase that overlap or meet; one detection per connected set.

    The merged detection keeps the best piece's label, phrase and provenance; its tile id lists
    every tile it came from, its score is the best known one and its flags are all the pieces'.
    """
    if not detections:
        return []
    order = rank(detections)
    detections = [detections[i] for i in order]  # best first: each group's root is its best
    geoms = geometry_array(detections)
    if touch_distance is None:
        extent = np.abs(shapely.bounds(geoms)).max()
        touch_distance = RELATIVE_TOUCH * max(1.0, float(np.nan_to_num(extent)))
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="dwithin", distance=touch_distance)
    codes = _label_codes(detections)
    same = (codes[left] == codes[right]) & (left < right)
    groups = _components(len(detections), left[same], right[same])
    merged = []
    for members in groups:
        best = detections[members[0]]
        if len(members) == 1:
            merged.append(best)
            continue
        pieces = [detections[i] for i in members]
        geometry = shapely.union_all(geoms[members], grid_size=touch_distance or None)
        scores = [p.score for p in pieces if p.score is not None]
        flags = list(dict.fromkeys(f for p in pieces for f in p.flags))
        tiles = sorted({p.tile_id for p in pieces if p.tile_id})
        merged.append(
            replace(
                best,
                geometry=geometry,
                score=max(scores) if scores else None,
                flags=flags,
                tile_id=",".join(tiles),
                attributes=dict(best.attributes),
            )
        )
    return merged


def _iou(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """Intersection over union from the intersection and the two areas (0 where both are 0)."""
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _label_codes(detections: Sequence[Detection]) -> np.ndarray:
    """One integer per detection; equal for labels that differ only in case or spacing."""
    names = [" ".join(d.label.lower().split()) for d in detections]
    return np.unique(np.array(names, dtype=object), return_inverse=True)[1].ravel()


def _components(count: int, left: np.ndarray, right: np.ndarray) -> list[list[int]]:
    """Connected sets of ``range(count)`` linked by the pairs, each sorted, by smallest member."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(left.tolist(), right.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _check_one_frame(detections: Sequence[Detection]) -> None:
    """GeoChatError unless all detections share one frame and CRS."""
    frames = {d.frame for d in detections}
    crss = list(dict.fromkeys(d.crs for d in detections))
    if len(frames) > 1 or any(not same_crs(crss[0], c) for c in crss[1:]):
        raise GeoChatError(
            "detections to merge are in different frames or CRSs: georeference them all to one "
            "CRS first"
        )
