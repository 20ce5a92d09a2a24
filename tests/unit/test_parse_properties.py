"""Property tests: every parser takes any text; prompts and answers round-trip through parsers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geochat_qgis.core.errors import ParseError
from geochat_qgis.core.families import FAMILIES, get_family
from geochat_qgis.core.results import Answer

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# text built from the pieces the grammars use, so the parsers' branches are reached often
PIECES = st.sampled_from(
    ["<p>", "</p>", "{", "}", "<", ">", "|", "[SEG]", "</s>", "12", "-3", "100", "250", " ",
     "\n", "plane", '"bbox_2d"', '"label"', ":", "[", "]", ",", '"', "```json", "```", "1e999",
     "{<10><20><30><40>|<45>}", '{"bbox_2d": [1, 2, 3, 4], "label": "x"}']
)
TEXT = st.one_of(st.text(max_size=300), st.lists(PIECES, max_size=60).map("".join))
SIZES = st.one_of(
    st.integers(min_value=-5, max_value=2000),
    st.tuples(st.integers(-5, 600), st.integers(-5, 600)),
    st.sampled_from([None, "504", 504.0, True, (1, 2, 3), ("a", 3), [64, 32]]),
)


def _check(family_name: str, raw: str, tile_size, masks=None) -> None:
    family = get_family(family_name, **({"angle_convention": "ccw"} if family_name == "geochat" else {}))
    try:
        answer = family.parse(raw, tile_size, masks)
    except ParseError:
        return
    assert isinstance(answer, Answer) and isinstance(answer.text, str)
    width, height = tile_size if isinstance(tile_size, (tuple, list)) else (tile_size, tile_size)
    for det in answer.detections:
        x1, y1, x2, y2 = det.bbox
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert det.geometry.is_valid and det.label
        assert det.span is None or raw[det.span[0]:det.span[1]]


@pytest.mark.parametrize("name", sorted(FAMILIES))
@FAST
@given(raw=TEXT, tile_size=SIZES)
def test_any_text_gives_an_answer_or_parse_error(name, raw, tile_size):
    _check(name, raw, tile_size)


@FAST
@given(raw=TEXT, n=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_geopixel_any_text_with_any_masks(raw, n, seed):
    masks = np.random.default_rng(seed).normal(size=(n, 12, 12)).astype(np.float32)
    _check("geopixel", raw, 24, masks)


@FAST
@given(raw=TEXT, junk=st.sampled_from([None, np.zeros((2, 0, 3)), np.ones(3), "masks", [[1]]]))
def test_geopixel_odd_masks_raise_only_parse_error(raw, junk):
    _check("geopixel", raw, 24, junk)


# boxes with width and height (a zero-size box is widened: tested in test_families_geochat)
BOX = st.tuples(*[st.integers(0, 100)] * 4, st.one_of(st.none(), st.integers(0, 89))).filter(
    lambda b: b[0] != b[2] and b[1] != b[3]
)


@FAST
@given(boxes=st.lists(st.tuples(st.sampled_from(["plane", "ship", "storage tank"]), BOX),
                      min_size=1, max_size=6),
       side=st.integers(28, 1024))
def test_geochat_answers_round_trip(boxes, side):
    """A grounded answer written in GeoChat's grammar parses back to the same boxes."""
    parts = []
    for label, (x1, y1, x2, y2, theta) in boxes:
        angle = "" if theta is None else f"|<{theta}>"
        parts.append(f"a <p>{label}</p> {{<{x1}><{y1}><{x2}><{y2}>{angle}}}")
    answer = get_family("geochat").parse(" and ".join(parts) + ".", side)
    assert answer.problems == []
    assert [d.label for d in answer.detections] == [label for label, _ in boxes]
    for det, (_, (x1, y1, x2, y2, theta)) in zip(answer.detections, boxes):
        expected = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        assert det.bbox == pytest.approx([v * side / 100 for v in expected])
        assert det.angle == theta


@FAST
@given(cx=st.floats(20, 80), cy=st.floats(20, 80), w=st.floats(4, 30), h=st.floats(4, 30),
       angle=st.floats(0, 180), convention=st.sampled_from(["ccw", "cw"]))
def test_region_prompt_round_trips_to_the_drawn_rectangle(cx, cy, w, h, angle, convention):
    """A rotated rectangle drawn as the region comes back from the prompt's box (within rounding)."""
    family = get_family("geochat", angle_convention=convention)
    drawn = shapely.affinity.rotate(shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
                                    angle, origin="centroid")
    prompt = family.build_prompt("identify", region=drawn, tile_size=100)
    (det,) = family.parse(prompt, 100).detections
    # integer coordinates and degrees: corners move by at most ~1 px + rotation rounding
    assert det.geometry.hausdorff_distance(drawn) < 1.0 + np.radians(0.5) * max(w, h)


@FAST
@given(items=st.lists(st.tuples(st.text(max_size=12),
                                st.lists(st.integers(0, 504), min_size=4, max_size=4).filter(
                                    lambda b: b[0] != b[2] and b[1] != b[3])), max_size=5),
       fenced=st.booleans())
def test_qwen_answers_round_trip(items, fenced):
    payload = json.dumps([{"bbox_2d": b, "label": label} for label, b in items])
    raw = f"```json\n{payload}\n```" if fenced else f"Result: {payload}"
    answer = get_family("qwen2.5-vl").parse(raw, 504)
    assert len(answer.detections) == len(items)
    for det, (label, b) in zip(answer.detections, items):
        assert det.bbox == (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
        assert det.label == (" ".join(label.split()) or "object")
