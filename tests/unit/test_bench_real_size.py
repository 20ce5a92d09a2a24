"""bench/real_size.py's smoke run: tiny dimensions, the project against llama-cpp-python's
LLaVA handler on the same tiles (the real-size figures are in bench/README.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "real_size.py"


def test_real_size_smoke_prints_the_ratios(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--tiny", "--cache", str(tmp_path),
                          "--tiles", "2", "--tokens", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    *_, figures, ratios = (json.loads(line) for line in run.stdout.splitlines()[-2:])
    assert set(ratios) == {"prompts4_over_1", "naive_over_project_4", "followup_over_first",
                           "project_over_raw_1"}
    assert all(isinstance(value, float) and value > 0 for value in ratios.values())
    # what the project saves, counted in tokens (times are the benchmark's): 4 prompts read the
    # system text and image once and then only their own text; the naive way reads all 4 times
    one, four = figures["project_1_tokens_evaluated"], figures["project_4_tokens_evaluated"]
    assert one < four < one + 3 * 15
    assert figures["naive_4_tokens_evaluated"] > 3.5 * figures["raw_1_tokens_evaluated"]
    assert figures["follow_up_tokens_evaluated"] < figures["first_turn_tokens_evaluated"] / 4


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 40  # not Linux: assume enough


def test_real_size_1b_smoke_run():
    """The 1.1B variant (TinyLlama's shape + CLIP ViT-L/14 at 504 px, q4_k_m) on one tile, both
    ways: a smoke run at real prompt length (its timings are bench/README.md's, not asserted).
    The pair is built once into bench/.cache (about 1.3 GB, a few minutes on 2 cores)."""
    if _available_bytes() < 4 << 30:
        pytest.skip("the 1.1B smoke run needs about 4 GB of free memory")
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--tiles", "1", "--tokens", "2"],
                         capture_output=True, text=True, timeout=2400)
    assert run.returncode == 0, run.stderr[-2000:]
    *_, figures, ratios = (json.loads(line) for line in run.stdout.splitlines()[-2:])
    assert figures["variant"] == "1b" and all(value > 0 for value in ratios.values())
    # GeoChat's real prompt: 1,296 image rows (36 x 36 patches of 14 px at 504 px) + its text
    assert 1296 + 60 < figures["project_1_tokens_evaluated"] < 1296 + 200
    assert abs(figures["raw_1_tokens_evaluated"] - figures["project_1_tokens_evaluated"]) <= 4
    assert figures["project_4_tokens_evaluated"] < figures["project_1_tokens_evaluated"] + 3 * 15
    assert figures["follow_up_tokens_evaluated"] < 100
