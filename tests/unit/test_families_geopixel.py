"""GeoPixel family: prompts, [SEG] phrases paired in order with masks, masks to polygons."""
from __future__ import annotations

import numpy as np
import pytest

from geochat_qgis.core.errors import GeoChatError, ParseError
from geochat_qgis.core.families import get_family


@pytest.fixture
def geopixel():
    return get_family("geopixel")


def _logits(shape, *rects, hole=None):
    """(n, H, W) float logits: +4 inside each rectangle (r0, r1, c0, c1) of its mask, -4 elsewhere."""
    masks = np.full((len(rects), *shape), -4.0, dtype=np.float32)
    for k, (r0, r1, c0, c1) in enumerate(rects):
        masks[k, r0:r1, c0:c1] = 4.0
    if hole is not None:
        k, (r0, r1, c0, c1) = hole
        masks[k, r0:r1, c0:c1] = -4.0
    return masks


def test_prompts_are_geopixels_own(geopixel):
    assert geopixel.build_prompt("grounding") == (
        "Can you provide a thorough description of this image? Please output with interleaved "
        "segmentation masks for the corresponding phrases."
    )
    assert geopixel.build_prompt("segment", "the red roof") == (
        "Could you provide a segmentation mask for the red roof in this image?"
    )
    with pytest.raises(GeoChatError, match="refer"):
        geopixel.build_prompt("refer", "x")


def test_phrases_pair_in_order_with_masks_holes_kept(geopixel):
    masks = _logits((64, 64), (8, 24, 8, 40), (40, 56, 40, 56), hole=(0, (12, 16, 12, 16)))
    answer = geopixel.parse(
        "The image shows <p> a large building </p> [SEG] beside <p>a pond</p>[SEG].", 128, masks
    )
    assert answer.text == "The image shows a large building beside a pond."
    assert answer.problems == []
    building, pond = answer.detections
    assert (building.label, pond.label) == ("a large building", "a pond")
    assert building.kind == "mask"
    # mask pixels scale x2 to the 128 px tile: 32 x 16 mask px minus a 4 x 4 hole
    assert building.geometry.area == pytest.approx((64 * 32) - (8 * 8))
    assert len(building.geometry.interiors) == 1
    assert building.bbox == (16.0, 16.0, 80.0, 48.0)
    assert pond.bbox == (80.0, 80.0, 112.0, 112.0)
    assert pond.margin == 16.0


def test_boolean_masks_and_a_jagged_edge_simplify_within_half_a_pixel(geopixel):
    mask = np.zeros((1, 40, 40), dtype=bool)
    for row in range(5, 35):
        mask[0, row, 5 : 10 + row // 2] = True  # a staircase edge
    (det,) = geopixel.parse("<p>field</p> [SEG]", 40, mask).detections
    pixels = int(mask.sum())
    assert abs(det.geometry.area - pixels) <= 0.5 * det.geometry.length
    assert len(det.geometry.exterior.coords) < 4 * 30  # simplified: fewer than the stairs


@pytest.mark.parametrize(
    "text, n_masks, paired",
    [("<p>a</p>[SEG] <p>b</p>[SEG] <p>c</p>[SEG]", 2, 2), ("<p>a</p>[SEG]", 3, 1)],
)
def test_count_mismatch_is_flagged_not_raised(geopixel, text, n_masks, paired):
    masks = _logits((16, 16), *[(0, 4, 4 * k, 4 * k + 2) for k in range(n_masks)])
    answer = geopixel.parse(text, 16, masks)
    assert len(answer.detections) == paired
    assert any("[SEG]" in p and "masks" in p for p in answer.problems)


def test_empty_mask_and_seg_without_phrase(geopixel):
    masks = _logits((16, 16), (0, 0, 0, 0), (2, 6, 2, 6))
    answer = geopixel.parse("<p>nothing</p>[SEG] and [SEG]", 16, masks, default_label="thing")
    assert [d.label for d in answer.detections] == ["thing"]
    assert any("empty" in p for p in answer.problems)


def test_bad_masks_raise_parse_error(geopixel):
    with pytest.raises(ParseError, match="n, height, width"):
        geopixel.parse("<p>x</p>[SEG]", 16, np.zeros((1, 2, 3, 4)))
    with pytest.raises(ParseError):
        geopixel.parse("<p>x</p>[SEG]", 16, np.array([["a"]]))
