"""QGIS's own Qt6 migration checker (``pyqt5_to_pyqt6``, package qgis-pyqt5to6) finds nothing.

The checker rewrites files in place, so it runs over a copy of the plugin package; every file it
would change, and every warning it prints, is a finding. It needs Python >= 3.12 with PyQt6 and
PyQt6-QScintilla beside it: ``python3 build.py setup`` makes .venv-qt6check for it. Without QGIS
4's own Python bindings it checks Qt's enums and calls (a "partial upgrade"), not QGIS's enums.
"""
from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / ".venv-qt6check" / "bin" / "pyqt5to6"
PARTIAL = "QGIS classes not available for introspection"

pytestmark = pytest.mark.skipif(
    not CHECKER.is_file(),
    reason="no .venv-qt6check: `python3 build.py setup` makes it where a Python >= 3.12 exists",
)


def run_checker(package: Path, tmp_path: Path) -> tuple[int, list[str], list[str]]:
    """(exit code, printed findings, unified diffs) of the checker over a copy of ``package``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    copy = tmp_path / package.name
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([str(CHECKER), str(copy)], capture_output=True, text=True, timeout=300)
    printed = [line for line in (result.stdout + result.stderr).splitlines()
               if line.strip() and PARTIAL not in line]
    diffs = []
    for original in sorted(package.rglob("*.py")):
        if "__pycache__" in original.parts:
            continue
        before = original.read_text(encoding="utf-8").splitlines(keepends=True)
        after = (copy / original.relative_to(package)).read_text(encoding="utf-8").splitlines(keepends=True)
        if before != after:
            name = f"{package.name}/{original.relative_to(package).as_posix()}"
            diffs.append("".join(difflib.unified_diff(before, after, name, name + " (Qt6)")))
    return result.returncode, printed, diffs


def test_plugin_package_is_qt6_clean(tmp_path):
    code, printed, diffs = run_checker(ROOT / "geochat_qgis", tmp_path)
    assert not diffs and not printed and code == 0, (
        "QGIS's Qt6 migration checker has findings:\n" + "\n".join(printed) + "\n" + "\n".join(diffs))


def test_checker_reports_qt5_only_code(tmp_path):
    """The check can fail: an unscoped enum and exec_() are found."""
    package = tmp_path / "src" / "qt5plugin"
    package.mkdir(parents=True)
    (package / "dock.py").write_text(
        "from qgis.PyQt.QtCore import Qt\n"
        "from qgis.PyQt.QtWidgets import QDialog\n"
        "AREA = Qt.RightDockWidgetArea\n"
        "def ask(dialog: QDialog) -> int:\n"
        "    return dialog.exec_()\n")
    code, _printed, diffs = run_checker(package, tmp_path / "out")
    assert code != 0 and len(diffs) == 1
    assert "Qt.DockWidgetArea.RightDockWidgetArea" in diffs[0] and "exec()" in diffs[0]
