"""convert on a full disk or into a read-only folder: a message, no traceback, nothing left
behind (issue 15: 11)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hostile
import pytest

from geochat_qgis.core.weights.tiny import build_tiny_geochat

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_geochat(tmp_path_factory.mktemp("ckpt") / "geochat", "geochat-checkpoint")


def _convert(src: Path, out: Path, to: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geochat_qgis", "convert", "geochat", str(src),
                           str(out), "--to", to], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.parametrize("to", ["gguf", "hf"])
def test_convert_on_a_full_disk(checkpoint, tmp_path, to):
    disk = tmp_path / "disk"
    hostile.mount_tmpfs(disk, "600k")  # smaller than the converted tiny model
    try:
        run = _convert(checkpoint, disk / "out", to)
        left = list(disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert run.returncode == 1
    assert "disk is full" in run.stderr and "Traceback" not in run.stderr
    assert left == []


def test_convert_into_a_read_only_folder(checkpoint, tmp_path):
    folder = tmp_path / "ro"
    hostile.mount_tmpfs(folder, "64k")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        run = _convert(checkpoint, folder / "out", "hf")
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert run.returncode == 1
    assert "read-only" in run.stderr and "Traceback" not in run.stderr
