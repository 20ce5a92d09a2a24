"""``python -m geochat_qgis parse``: stdin in, one JSON object out, as the issue specifies."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _parse(stdin: bytes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geochat_qgis", "parse", *args],
        input=stdin, capture_output=True, cwd=ROOT, timeout=60,
    )


def test_geochat_output_as_json():
    raw = "<p>planes</p> {<10><20><30><40>|<45>}{<50><60><70><80>} near a road. {<1><2"
    done = _parse(raw.encode(), "--family", "geochat", "--tile-size", "200")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert set(doc) == {"text", "detections", "problems"}
    assert doc["text"] == "planes near a road."
    first, second = doc["detections"]
    assert set(first) == {"label", "bbox", "angle", "polygon"}
    assert first == {
        "label": "planes", "bbox": [20.0, 40.0, 60.0, 80.0], "angle": 45.0,
        "polygon": [[60.0, 40.0], [60.0, 80.0], [20.0, 80.0], [20.0, 40.0], [60.0, 40.0]],
    }
    assert second["angle"] is None and second["bbox"] == [100.0, 120.0, 140.0, 160.0]
    assert len(doc["problems"]) == 1 and "cut off" in doc["problems"][0]


def test_oriented_polygon_with_angle_convention():
    done = _parse(b"{<40><45><60><55>|<90>}", "--family", "geochat", "--tile-size", "100",
                  "--angle-convention", "cw")
    (det,) = json.loads(done.stdout)["detections"]
    xs = [p[0] for p in det["polygon"]]
    ys = [p[1] for p in det["polygon"]]
    assert (min(xs), max(xs), min(ys), max(ys)) == pytest.approx((45, 55, 40, 60))


def test_geopixel_with_masks_file(tmp_path):
    masks = np.full((2, 32, 32), -1.0, dtype=np.float32)
    masks[0, 0:8, 0:16] = 2.0
    masks[1, 16:24, 16:20] = 2.0
    masks[1, 28:30, 28:30] = 2.0  # a second, smaller part
    np.save(tmp_path / "m.npy", masks)
    done = _parse(b"A <p>roof</p> [SEG] and <p>yard</p> [SEG].", "--family", "geopixel",
                  "--tile-size", "64", "--masks", str(tmp_path / "m.npy"))
    doc = json.loads(done.stdout)
    assert doc["text"] == "A roof and yard."
    roof, yard = doc["detections"]
    assert roof["bbox"] == [0.0, 0.0, 32.0, 16.0] and roof["angle"] is None
    assert yard["bbox"] == [32.0, 32.0, 60.0, 60.0]
    assert len(yard["polygon"]) == 5 and max(p[0] for p in yard["polygon"]) == 40.0  # largest part


def test_qwen_and_problems_never_fail():
    done = _parse('```json\n[{"bbox_2d": [1, 2, 3], "label": "x"}]\n```'.encode(),
                  "--family", "qwen2.5-vl")
    assert done.returncode == 0
    doc = json.loads(done.stdout)
    assert doc["detections"] == [] and "not four numbers" in doc["problems"][0]


def test_invalid_utf8_is_reported_and_unreadable_masks_fail(tmp_path):
    done = _parse(b"caf\xe9 {<1><2><3><4>}", "--family", "geochat")
    doc = json.loads(done.stdout)
    assert done.returncode == 0 and len(doc["detections"]) == 1
    assert "UTF-8" in doc["problems"][0]
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    failed = _parse(b"<p>x</p>[SEG]", "--family", "geopixel", "--masks", str(tmp_path / "bad.npy"))
    assert failed.returncode != 0 and b"masks" in failed.stderr
