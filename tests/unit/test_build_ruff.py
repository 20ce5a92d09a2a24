"""ruff over the whole checkout with the project's ruff.toml: any finding fails."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ruff() -> str:
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.is_file() else shutil.which("ruff")
    if not found:
        pytest.fail("ruff is not installed: `python3 build.py setup` installs it (requirements-test.txt)")
    return found


def test_ruff_finds_nothing():
    result = subprocess.run([ruff(), "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff findings (fix them, or see ruff.toml):\n{result.stdout}{result.stderr}"


def test_ruff_reports_a_finding(tmp_path):
    """The check can fail: a file with an unused import is reported under the same config."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    result = subprocess.run([ruff(), "check", "--no-cache", "--config", str(ROOT / "ruff.toml"), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "F401" in result.stdout
