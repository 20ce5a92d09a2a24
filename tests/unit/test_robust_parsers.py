"""Hostile model answers cost one tile at most: parsers raise ParseError or answer (issue 15: 7,
14, 15), and random bytes reach every parser."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geochat_qgis.core.errors import ParseError
from geochat_qgis.core.families import FAMILIES, get_family

ROOT = Path(__file__).resolve().parents[2]
MANY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _families():
    for name in sorted(FAMILIES):
        yield get_family(name)
        if name == "geochat":
            yield get_family(name, angle_convention="ccw")
            yield get_family(name, angle_convention="cw")


def _parse_or_parse_error(family, raw: str, size=504, masks=None):
    try:
        answer = family.parse(raw, size, masks)
    except ParseError:
        return None
    for det in answer.detections:
        assert det.geometry.is_valid
        assert all(math.isfinite(v) for v in det.bbox)
        assert det.angle is None or math.isfinite(det.angle)
    return answer


@MANY
@given(data=st.binary(max_size=2000), encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_random_bytes_reach_every_parser(data, encoding):
    raw = data.decode(encoding, errors="replace")
    for family in _families():
        _parse_or_parse_error(family, raw)


@MANY
@given(data=st.binary(min_size=0, max_size=600), shape=st.sampled_from([(1, 8, 8), (3, 4, 5),
                                                                         (2, 10, 10)]))
def test_random_bytes_as_masks(data, shape):
    count = int(np.prod(shape))
    values = np.frombuffer(data.ljust(count * 4, b"\0")[: count * 4], dtype=np.float32)
    _parse_or_parse_error(get_family("geopixel"), "<p>a</p> [SEG] <p>b</p> [SEG]", 32,
                          values.reshape(shape))


def test_a_5000_digit_number_in_a_qwen_answer_is_a_problem_not_a_crash():
    raw = '{"bbox_2d": [' + "9" * 5000 + ', 1, 2, 3], "label": "car"}'
    answer = get_family("qwen2.5-vl").parse(raw, 504)
    assert answer.detections == []
    assert any("not four numbers" in p for p in answer.problems)
    assert all(len(p) < 300 for p in answer.problems)


def test_a_400_digit_angle_with_the_ccw_convention_keeps_the_box():
    raw = "<p>car</p> {<10><10><40><40>|<" + "7" * 400 + ">}"
    (det,) = get_family("geochat", angle_convention="ccw").parse(raw, 504).detections
    assert det.angle is None and "bad_angle" in det.flags
    assert det.bbox == pytest.approx((50.4, 50.4, 201.6, 201.6))


def test_parse_prints_strict_json_for_numbers_of_309_digits():
    raw = "{<10><10><40><40>|<" + "9" * 320 + ">}"
    done = subprocess.run([sys.executable, "-m", "geochat_qgis", "parse", "--family", "geochat"],
                          input=raw.encode(), capture_output=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Infinity" not in done.stdout.decode()
    document = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(name))
    assert document["detections"][0]["angle"] is None


@pytest.mark.parametrize("raw", ["{" + "<" * 200_000, ("{" + "<" * 50) * 4000,
                                 "{<1>" + "<" * 200_000 + "}"])
def test_the_geochat_parser_is_linear_on_open_boxes(raw):
    """A quadratic scan took 52 s on 80 KB; linear takes milliseconds. The bound is 100x slack."""
    start = time.perf_counter()
    get_family("geochat").parse(raw, 504)
    assert time.perf_counter() - start < 5.0


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["choices", "message", "content", "delta",
                                                       "usage", "finish_reason", "x"]),
                                      inner, max_size=4), max_leaves=20)


@MANY
@given(value=JSON)
def test_any_json_from_a_server_is_a_completion_or_value_error(value):
    from geochat_qgis.core.backends.openai_http import _completion

    try:
        text, usage, _ = _completion(value)
    except ValueError:
        return
    assert isinstance(text, str) and isinstance(usage, dict)


@MANY
@given(lines=st.lists(st.binary(max_size=60), max_size=8))
def test_any_event_stream_bytes_give_json_or_value_error(lines):
    from geochat_qgis.core.backends.openai_http import _sse_events

    try:
        list(_sse_events([b"data: " + line + b"\n" for line in lines]))
    except ValueError:
        pass


@MANY
@given(text=st.text(max_size=40))
def test_any_argument_text_is_a_value_or_a_usage_error(text):
    import argparse

    from geochat_qgis.cli import join_negative_values
    from geochat_qgis.cli.argtypes import fraction, positive_float, positive_int
    from geochat_qgis.cli.detect import _extent

    assert len(join_negative_values(["--extent", text])) in (1, 2)
    for parse in (positive_int, positive_float, fraction, _extent):
        try:
            parse(text)
        except argparse.ArgumentTypeError:
            pass
