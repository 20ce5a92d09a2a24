"""The architecture's import rules, checked on the source: the core imports neither QGIS nor Qt
nor the front ends, and heavy libraries load lazily (never at a module's top level)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "geochat_qgis"
QT_OR_QGIS = ("qgis", "PyQt5", "PyQt6", "qtpy", "PySide2", "PySide6", "sip")
FRONT_ENDS = ("gui", "processing", "toolbelt", "cli", "plugin")
HEAVY = ("torch", "transformers", "llama_cpp")


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(module, level) of every import in ``path`` (level > 0: relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def core_files() -> list[Path]:
    return sorted((PACKAGE / "core").rglob("*.py"))


def test_the_core_imports_no_qgis_no_qt_and_no_front_end():
    offenders = []
    for path in core_files():
        for module, level in imports(path):
            root = module.split(".")[0]
            if level == 0 and root in QT_OR_QGIS:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {module}")
            # from core/x.py, level 2 reaches geochat_qgis/, deeper files need more dots
            depth = len(path.relative_to(PACKAGE).parts) - 1
            if level > depth and root in FRONT_ENDS:
                offenders.append(f"{path.relative_to(PACKAGE)} imports the front end {module}")
    assert core_files() and offenders == []


def test_heavy_libraries_are_imported_lazily():
    offenders = [
        f"{path.relative_to(PACKAGE)} imports {module} at module level"
        for path in sorted(PACKAGE.rglob("*.py"))
        for module, level in imports(path, top_level_only=True)
        if level == 0 and module.split(".")[0] in HEAVY
    ]
    assert offenders == []
