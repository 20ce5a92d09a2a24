"""`python -m geochat_qgis --help` works from the venv without QGIS."""
from __future__ import annotations

import subprocess
import sys


def test_help_lists_commands_without_qgis():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "geochat_qgis", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m geochat_qgis" in result.stdout
    for command in ("tiles", "parse", "detect"):
        assert command in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {"qgis", "PyQt5", "torch", "transformers", "llama_cpp"} & imported


def test_version_flag():
    result = subprocess.run([sys.executable, "-m", "geochat_qgis", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "0." in result.stdout
