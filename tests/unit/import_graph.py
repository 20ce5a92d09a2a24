"""The package's own import graph, read from the source with ``ast``: which of our modules each
module imports (at its top or inside a function), the circles among them, and the imports of our
own modules made inside a function."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One import of our own modules: ``source`` imports ``target`` (both dotted module names)
    at ``line``, inside a function when ``local``, for type hints only (``if TYPE_CHECKING:``)
    when ``typing``."""

    source: str
    target: str
    line: int
    local: bool
    typing: bool = False


def module_name(root: Path, path: Path) -> str:
    """``pkg/a/b.py`` -> ``pkg.a.b``; ``pkg/a/__init__.py`` -> ``pkg.a``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` (a folder with an ``__init__.py``) by name."""
    return {module_name(root, path): path for path in sorted(root.rglob("*.py"))}


def _absolute(name: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute dotted name of ``from <level dots><module>`` written in module ``name``."""
    if level == 0:
        return module or ""
    base = name.split(".")
    base = base[:len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def _raw_imports(tree: ast.AST) -> list[tuple[ast.AST, bool, bool]]:
    """(import node, inside a function, under ``if TYPE_CHECKING:``) for every import."""
    found: list[tuple[ast.AST, bool, bool]] = []

    def visit(node: ast.AST, local: bool, typing: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, local, True)
            for child in node.orelse:
                visit(child, local, typing)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, local, typing))
        inside = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside, typing)

    visit(tree, False, False)
    return found


def own_imports(root: Path) -> list[Import]:
    """Every import, in the package at ``root``, of one of its own modules. ``from pkg import x``
    counts as an import of ``pkg.x`` where that is a module, else of ``pkg``. Imports for type
    hints only are included (marked ``typing``): a type is a dependency too."""
    modules = package_modules(root)
    top = root.name
    found: list[Import] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, local, typing in _raw_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _absolute(name, is_package, node.module, node.level)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in dict.fromkeys(targets):
                if target.split(".")[0] == top and target in modules and target != name:
                    found.append(Import(name, target, node.lineno, local, typing))
    return found


def circles(edges: list[Import]) -> list[list[str]]:
    """The circles among the modules, each as the modules of one strongly connected component
    (Tarjan's algorithm), sorted; a module importing itself does not count."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def describe(component: list[str], edges: list[Import]) -> str:
    """One circle as the imports that close it: ``a -> b (line 12, local)``..."""
    members = set(component)
    links = [f"{e.source} -> {e.target} (line {e.line}{', local' if e.local else ''}"
             f"{', type hints' if e.typing else ''})"
             for e in edges if e.source in members and e.target in members]
    return "; ".join(sorted(links))


def inside(module: str, package: str) -> bool:
    """``module`` is ``package`` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def upward_imports(edges: list[Import], layers: list[tuple[tuple[str, ...], tuple[str, ...]]],
                   top: str) -> list[Import]:
    """The imports that point up the layers. Each rule is (lower, higher), package names below
    ``top`` (``core.vision``): no module inside a lower package may import one inside a higher
    package, at the top of the file, inside a function or for type hints."""
    found: list[Import] = []
    for edge in edges:
        for lower, higher in layers:
            if (any(inside(edge.source, f"{top}.{name}") for name in lower)
                    and any(inside(edge.target, f"{top}.{name}") for name in higher)):
                found.append(edge)
                break
    return found
