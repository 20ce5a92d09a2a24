"""Qwen2.5-VL family: bbox_2d JSON in fences, inline, malformed; absolute input pixels."""
from __future__ import annotations

import pytest
from shapely.geometry import box

from geochat_qgis.core.families import get_family
from geochat_qgis.core.families.qwen import input_dims


@pytest.fixture
def qwen():
    return get_family("qwen2.5-vl")


def test_fenced_json_list(qwen):
    raw = (
        "Here are the cars:\n```json\n[\n  {\"bbox_2d\": [10, 20, 110, 60], \"label\": \"car\"},"
        "\n  {\"bbox_2d\": [200, 210, 250, 300], \"label\": \"white car\"}\n]\n```\nThat is all."
    )
    answer = qwen.parse(raw, 504)
    assert [(d.label, d.bbox) for d in answer.detections] == [
        ("car", (10.0, 20.0, 110.0, 60.0)),
        ("white car", (200.0, 210.0, 250.0, 300.0)),
    ]
    assert answer.text == "Here are the cars:\n\nThat is all."
    assert answer.problems == []
    start, end = answer.detections[0].span
    assert raw[start:end].startswith("[") and raw[start:end].endswith("]")


def test_inline_object_and_nested_key(qwen):
    answer = qwen.parse('Found {"bbox_2d": [1, 2, 3, 4], "label": "tree"} and '
                        '{"result": {"objects": [{"bbox_2d": [5, 6, 7, 8]}]}}.', 56)
    assert [(d.label, d.bbox) for d in answer.detections] == [
        ("tree", (1.0, 2.0, 3.0, 4.0)), ("object", (5.0, 6.0, 7.0, 8.0))
    ]
    assert answer.text == "Found and."


def test_cut_off_json_is_read_by_pattern(qwen):
    raw = '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "boat"}, {"bbox_2d": [50, 60, 70, 80], "lab'
    answer = qwen.parse(raw, 504)
    assert [(d.label, d.bbox) for d in answer.detections] == [
        ("boat", (10.0, 20.0, 30.0, 40.0)), ("object", (50.0, 60.0, 70.0, 80.0))
    ]
    assert answer.problems and all("malformed JSON" in p for p in answer.problems)


def test_bad_boxes_and_clipping(qwen):
    answer = qwen.parse('[{"bbox_2d": [1, 2, 3], "label": "a"}, {"bbox_2d": [true, 1, 2, 3]},'
                        ' {"bbox_2d": [-10, 5, 600, 1e999]}, {"bbox_2d": [9, 9, 1, 1]}]', 504)
    assert [d.bbox for d in answer.detections] == [(1.0, 1.0, 9.0, 9.0)]
    assert "reordered" in answer.detections[0].flags
    assert sum("not four numbers" in p for p in answer.problems) == 3


def test_clipped_to_tile(qwen):
    (det,) = qwen.parse('{"bbox_2d": [-10, 5, 600, 50], "label": "road"}', 504).detections
    assert det.bbox == (0.0, 5.0, 504.0, 50.0) and "clipped" in det.flags
    outside = qwen.parse('{"bbox_2d": [510, 5, 600, 50], "label": "road"}', 504)
    assert outside.detections == [] and "outside" in outside.problems[0]


def test_tile_not_multiple_of_28_is_scaled_back(qwen):
    assert input_dims(500, 500) == (504, 504)
    (det,) = qwen.parse('{"bbox_2d": [0, 0, 504, 252]}', 500).detections
    assert det.bbox == pytest.approx((0, 0, 500, 250))


def test_prompts(qwen):
    assert "JSON" in qwen.build_prompt("refer", "the bridge")
    assert qwen.build_prompt("grounding", classes=["car", "ship"]).startswith(
        "Locate every car, ship in the image"
    )
    assert qwen.build_prompt("identify", region=box(10, 20, 30, 40), tile_size=504) == (
        "What is the object in the region [10, 20, 30, 40]? Answer briefly."
    )
    assert qwen.preprocess.multiple_of == 28 and qwen.preprocess.pad_rgb is None
    assert (qwen.preprocess.size // 28) ** 2 >= 1024  # enough image tokens for grounding
