"""Where Python interpreters live on each platform: pure path logic, no process started.

Inside QGIS ``sys.executable`` is often not Python: ``qgis-bin.exe`` on Windows (OSGeo4W or the
standalone installer: ``<root>/bin/qgis-bin.exe``, Python in ``<root>/apps/Python3xx``),
``QGIS.app/Contents/MacOS/QGIS`` on macOS (Python in ``Contents/MacOS/bin/python3`` or the
bundled ``Contents/Frameworks/Python.framework``), ``/usr/bin/qgis`` on Linux. These functions
list the candidates in order; ``environment.find_base_python`` runs them to check the version.
"""
from __future__ import annotations

from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Sequence


def _path(platform: str, text: str) -> PurePath:
    return PureWindowsPath(text) if platform == "win32" else PurePosixPath(text)


def venv_python(env_path: str, platform: str) -> PurePath:
    """The interpreter of a virtual environment: ``Scripts\\python.exe`` on Windows."""
    root = _path(platform, env_path)
    return root / "Scripts" / "python.exe" if platform == "win32" else root / "bin" / "python"


def venv_site_packages_glob(platform: str) -> str:
    """The glob (relative to the environment) of its site-packages folder."""
    return "Lib/site-packages" if platform == "win32" else "lib/python*/site-packages"


def is_python_name(name: str) -> bool:
    """``python``, ``python3``, ``python3.12``, ``python.exe``, ``python3.exe``."""
    lowered = name.lower()
    stem = lowered[:-4] if lowered.endswith(".exe") else lowered
    return stem == "python" or (stem.startswith("python3") and
                                all(c.isdigit() or c == "." for c in stem[len("python"):]))


def base_python_candidates(platform: str, version: tuple[int, int], executable: str,
                           base_executable: str, base_prefix: str, prefix: str,
                           on_path: Sequence[str] = ()) -> list[str]:
    """Interpreters of ``version`` to try, best first (duplicates removed).

    ``executable``/``base_executable``/``base_prefix``/``prefix`` are the running process's
    ``sys`` values; ``on_path`` what ``shutil.which`` found for python names.
    """
    major, minor = version
    found: list[PurePath] = []
    for text in (base_executable, executable):
        if text and is_python_name(_path(platform, text).name):
            found.append(_path(platform, text))
    exe = _path(platform, executable) if executable else None
    if platform == "win32":
        for folder in (base_prefix, prefix):
            if folder:
                found += [_path(platform, folder) / n for n in ("python.exe", "python3.exe")]
        if exe is not None:
            root = exe.parent.parent  # <root>/bin/qgis-bin.exe
            apps = root / "apps" / f"Python{major}{minor}"
            found += [apps / "python.exe", apps / "python3.exe",
                      exe.parent / "python3.exe", exe.parent / "python.exe"]
    else:
        names = (f"python{major}.{minor}", f"python{major}", "python")
        for folder in (base_prefix, prefix):
            if folder:
                found += [_path(platform, folder) / "bin" / n for n in names]
        if platform == "darwin" and exe is not None:
            macos = exe.parent  # QGIS.app/Contents/MacOS/QGIS
            contents = macos.parent
            framework = (contents / "Frameworks" / "Python.framework" / "Versions"
                         / f"{major}.{minor}" / "bin")
            found += [macos / "bin" / n for n in names] + [framework / n for n in names]
        if platform.startswith("linux") and exe is not None:
            found += [exe.parent / n for n in names]  # /usr/bin/qgis -> /usr/bin/python3.11
    result = [str(p) for p in found] + [p for p in on_path if p]
    return list(dict.fromkeys(result))
