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


# torch-only packages (issue 22's plan): torch / transformers at their top is fine, as only a
# backend imports their torch modules, lazily
TORCH_PACKAGES = (PACKAGE / "core" / "models" / "geopixel",)


def test_heavy_libraries_are_imported_lazily():
    offenders = [
        f"{path.relative_to(PACKAGE)} imports {module} at module level"
        for path in sorted(PACKAGE.rglob("*.py"))
        for module, level in imports(path, top_level_only=True)
        if level == 0 and module.split(".")[0] in HEAVY
        and not any(pkg in path.parents for pkg in TORCH_PACKAGES)
    ]
    assert offenders == []


# ---------------------------------------------------------------- QGIS's process (issue 11)
# What QGIS's process may import, at load time and during use: QGIS, Qt through qgis.PyQt,
# GDAL's osgeo, the standard library, and the plugin's own modules that import only these.
QGIS_SIDE = ("plugin.py", "__init__.py", "__about__.py", "gui", "toolbelt", "processing",
             "client")
QGIS_ALLOWED_ROOTS = {"qgis", "osgeo"}
FORBIDDEN_IN_QGIS = {"numpy", "shapely", "rasterio", "pyproj", "pyogrio", "geopandas", "PIL",
                     "torch", "transformers", "llama_cpp", "gguf", "affine", "psutil",
                     "huggingface_hub", "sentencepiece"}


def runtime_imports(path: Path) -> list[tuple[str, int, int]]:
    """(module, level, line) of every import that can run: module level and inside functions,
    not under ``if TYPE_CHECKING:``."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module is None:  # from . import x, y: submodules or names
                found.extend((alias.name, node.level, node.lineno) for alias in node.names)
            else:
                found.append((node.module or "", node.level, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def module_path(dotted: str) -> Path | None:
    """The file of ``geochat_qgis.x.y`` (a module or a package), None for a name in a module."""
    parts = dotted.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def resolve(path: Path, module: str, level: int) -> str:
    """The absolute dotted name of an import in ``path``."""
    if level == 0:
        return module
    package = ["geochat_qgis", *path.relative_to(PACKAGE).parent.parts]
    package = package[:len(package) - (level - 1)]
    return ".".join(package + ([module] if module else []))


def qgis_side_files() -> list[Path]:
    files: list[Path] = []
    for entry in QGIS_SIDE:
        target = PACKAGE / entry
        files += [target] if target.is_file() else sorted(target.rglob("*.py"))
    return files


def test_qgis_side_imports_only_qgis_qt_osgeo_the_stdlib_and_stdlib_only_plugin_modules():
    """Every module QGIS's process can reach from the plugin (following the plugin's own
    imports, lazy ones too) imports nothing beyond qgis, osgeo and the standard library."""
    import sys

    stdlib = set(sys.stdlib_module_names)
    offenders: list[str] = []
    seen: set[Path] = set()
    todo = [p for p in qgis_side_files()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module, level, line in runtime_imports(path):
            name = resolve(path, module, level)
            root = name.split(".")[0]
            where = f"{path.relative_to(PACKAGE)}:{line} imports {name}"
            if root == "geochat_qgis":
                target = module_path(name) or module_path(name.rsplit(".", 1)[0])
                if target is None:
                    offenders.append(f"{where} (no such module)")
                    continue
                # a package's __init__ runs too when a submodule is imported
                parents = [module_path(".".join(name.split(".")[:i]))
                           for i in range(2, len(name.split(".")))]
                todo += [target, *[p for p in parents if p is not None]]
            elif root in FORBIDDEN_IN_QGIS or (root not in stdlib and root not in QGIS_ALLOWED_ROOTS):
                offenders.append(where)
    reached_core = sorted(str(p.relative_to(PACKAGE)) for p in seen if p.parts[-2:][0] == "core"
                          or "core" in p.relative_to(PACKAGE).parts)
    assert offenders == [], "\n".join(sorted(offenders)) + f"\n(core modules reached: {reached_core})"


def test_qt_comes_through_qgis_pyqt_only():
    """PyQt5/PyQt6 directly would pin one Qt: QGIS 4 runs Qt6 (issue 12)."""
    offenders = [f"{path.relative_to(PACKAGE)}:{line} imports {module}"
                 for path in qgis_side_files()
                 for module, level, line in runtime_imports(path)
                 if level == 0 and module.split(".")[0] in ("PyQt5", "PyQt6", "sip", "qtpy")]
    assert offenders == []


def test_the_check_sees_a_lazy_import_of_the_core(tmp_path, monkeypatch):
    """The walk follows imports inside functions and skips TYPE_CHECKING blocks only."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n"
                      "def f():\n    import shapely\n    from ..core import pipeline\n")
    found = {m for m, _level, _line in runtime_imports(source)}
    assert "shapely" in found and "core" in found and "numpy" not in found
