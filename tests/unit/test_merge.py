"""Merging across overlapping tiles: rotated NMS per label and mask stitching, on real tiles."""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from geochat_qgis.core.errors import GeoChatError
from geochat_qgis.core.families import get_family
from geochat_qgis.core.merge import merge_detections, rank
from geochat_qgis.core.results import Detection, georeference
from geochat_qgis.core.tiling import TileSpec, plan_tiles


def _det(label, geom, **kw):
    return Detection(label=label, geometry=geom, frame="raster", crs="EPSG:32618", **kw)


def test_nms_keeps_one_per_object_and_label():
    a = _det("plane", shapely.box(0, 0, 10, 10), margin=5.0)
    a_dup = _det("Plane ", shapely.box(1, 0, 11, 10), margin=0.0)  # IoU 0.82, cut by a border
    other_label = _det("hangar", shapely.box(0, 0, 10, 10), margin=1.0)
    far = _det("plane", shapely.box(50, 50, 60, 60), margin=1.0)
    kept = merge_detections([a_dup, other_label, a, far])
    assert {id(d) for d in kept} == {id(a), id(other_label), id(far)}


def test_rotated_boxes_use_polygon_iou():
    square = shapely.box(0, 0, 10, 10)
    turned = shapely.affinity.rotate(square, 45)  # IoU with the square ~0.71 by polygons
    dets = [_det("tank", square, margin=3.0), _det("tank", turned, margin=1.0)]
    assert len(merge_detections(dets, iou_threshold=0.6)) == 1
    assert len(merge_detections(dets, iou_threshold=0.8)) == 2


def test_tie_break_is_score_then_margin_then_area_and_order_independent():
    small = _det("car", shapely.box(0, 0, 10, 10), margin=4.0)
    large = _det("car", shapely.box(0, 0, 10, 11), margin=4.0)
    central = _det("car", shapely.box(0, 0, 10, 9), margin=9.0)
    scored = _det("car", shapely.box(0, 0, 9, 10), margin=0.0, score=0.3)
    assert rank([small, large]) == [1, 0]
    assert rank([small, large, central]) == [2, 1, 0]
    dets = [small, large, central, scored]
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        (kept,) = merge_detections([dets[i] for i in perm])
        assert kept is scored


def test_duplicate_box_from_overlapping_real_tiles_merges(data_dir):
    """One object seen by two overlapping tiles of a real raster ends as one feature."""
    plan = plan_tiles(data_dir / "cogeo.tif", TileSpec(tile_size=200, overlap=100))
    left, right = plan.tiles[0], plan.tiles[1]
    assert right.col_off - left.col_off == 100  # 100 px overlap: right tile x = left x - 100
    family = get_family("geochat")
    whole = georeference(family.parse("<p>car</p>{<60><40><80><50>}", 200).detections, left)
    cut = georeference(family.parse("<p>car</p>{<0><40><30><50>}", 200).detections, right)
    seen = georeference(family.parse("<p>car</p>{<10><40><30><50>}", 200).detections, right)
    (kept,) = merge_detections(whole + seen + cut)
    assert kept.tile_id in (left.tile_id, right.tile_id)
    assert kept.margin == pytest.approx(40.0)  # the view furthest from a tile edge wins


def test_masks_meeting_across_a_tile_border_are_unioned(data_dir):
    plan = plan_tiles(data_dir / "RGB.byte.tif", TileSpec(tile_size=64, overlap=0))
    a, b = plan.tiles[0], plan.tiles[1]
    assert b.col_off == a.col_off + 64
    mask_a = np.zeros((1, 64, 64), dtype=bool)
    mask_a[0, 10:30, 40:64] = True  # reaches the right border of tile a
    mask_b = np.zeros((1, 64, 64), dtype=bool)
    mask_b[0, 20:40, 0:20] = True  # starts at the left border of tile b
    family = get_family("geopixel")
    pieces = georeference(family.parse("<p>lake</p>[SEG]", 64, mask_a).detections, a)
    pieces += georeference(family.parse("<p>lake</p>[SEG]", 64, mask_b).detections, b)
    pieces += georeference(family.parse("<p>field</p>[SEG]", 64, mask_b).detections, b)
    merged = merge_detections(pieces)
    lake = [d for d in merged if d.label == "lake"]
    assert len(lake) == 1 and len(merged) == 2
    assert lake[0].geometry.geom_type == "Polygon"  # one piece, no sliver between tiles
    pixel_area = abs(plan.raster_transform.determinant)
    assert lake[0].geometry.area == pytest.approx((20 * 24 + 20 * 20) * pixel_area, rel=1e-6)
    assert lake[0].tile_id == ",".join(sorted([a.tile_id, b.tile_id]))


def test_separate_masks_of_one_phrase_stay_separate():
    far_apart = [_det("pond", shapely.box(0, 0, 1, 1), kind="mask"),
                 _det("pond", shapely.box(5, 5, 6, 6), kind="mask")]
    assert len(merge_detections(far_apart)) == 2


def test_mixed_crs_and_bad_threshold_are_refused():
    dets = [_det("a", shapely.box(0, 0, 1, 1)),
            Detection(label="a", geometry=shapely.box(0, 0, 1, 1), frame="raster",
                      crs="EPSG:4326")]
    with pytest.raises(GeoChatError, match="CRS"):
        merge_detections(dets)
    with pytest.raises(GeoChatError, match="between 0 and 1"):
        merge_detections(dets[:1], iou_threshold=1.5)
    assert merge_detections([]) == []


@settings(max_examples=60, deadline=None)
@given(boxes=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 12),
                                st.integers(0, 12), st.integers(0, 89), st.sampled_from("ab")),
                      min_size=1, max_size=25),
       threshold=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
def test_nms_equals_brute_force_greedy(boxes, threshold):
    """The vectorised NMS keeps exactly what a plain greedy pass over the ranking keeps."""
    dets = [_det(label, shapely.affinity.rotate(shapely.box(x, y, x + w, y + h), a),
                 margin=float(x % 7)) for x, y, w, h, a, label in boxes]
    order = rank(dets)
    kept: list[int] = []
    for i in order:
        a = dets[i].geometry
        duplicate = False
        for k in kept:
            if dets[k].label != dets[i].label:
                continue
            b = dets[k].geometry
            union = a.union(b).area
            iou = a.intersection(b).area / union if union > 0 else float(a.equals(b))
            if (iou > threshold) if threshold < 1.0 else (iou >= 1.0 - 1e-9):
                duplicate = True
                break
        if not duplicate:
            kept.append(i)
    assert [id(d) for d in merge_detections(dets, iou_threshold=threshold)] == \
        [id(dets[i]) for i in kept]
