"""Where QGIS's own Python is on Linux, Windows (OSGeo4W, standalone installer) and macOS (the
app bundle), and where a venv keeps its interpreter: the path logic, checked against each
platform's layout. Only the Linux layout also runs here (find_base_python on a real tree)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from geochat_qgis.core.deps import environment
from geochat_qgis.core.deps.environment import ManagedEnv, managed_python
from geochat_qgis.core.deps.locations import (
    base_python_candidates,
    is_python_name,
    venv_python,
    venv_site_packages_glob,
)


def test_venv_interpreter_per_platform():
    assert str(venv_python(r"C:\Users\a\AppData\Local\geochat-qgis\venv-py3.12-win32-amd64", "win32")) \
        == r"C:\Users\a\AppData\Local\geochat-qgis\venv-py3.12-win32-amd64\Scripts\python.exe"
    assert str(venv_python("/Users/a/Library/Application Support/geochat-qgis/v", "darwin")) \
        == "/Users/a/Library/Application Support/geochat-qgis/v/bin/python"
    assert str(venv_python("/home/a/.local/share/geochat-qgis/v", "linux")) \
        == "/home/a/.local/share/geochat-qgis/v/bin/python"
    assert venv_site_packages_glob("win32") == "Lib/site-packages"
    assert venv_site_packages_glob("linux") == "lib/python*/site-packages"


@pytest.mark.parametrize("name, expected", [
    ("python", True), ("python3", True), ("python3.12", True), ("python.exe", True),
    ("python3.exe", True), ("qgis-bin.exe", False), ("QGIS", False), ("qgis", False),
    ("python-qgis.bat", False), ("pythonw.exe", False),
])
def test_python_names(name, expected):
    assert is_python_name(name) is expected


def test_osgeo4w_qgis_finds_apps_python():
    """OSGeo4W: sys.executable is bin\\qgis-bin.exe; Python lives in apps\\Python312."""
    found = base_python_candidates(
        "win32", (3, 12), r"C:\OSGeo4W\bin\qgis-bin.exe", "", r"C:\OSGeo4W\apps\Python312",
        r"C:\OSGeo4W\apps\Python312")
    assert found[0] == r"C:\OSGeo4W\apps\Python312\python.exe"
    assert r"C:\OSGeo4W\apps\Python312\python3.exe" in found
    assert not any("qgis-bin" in c for c in found)  # QGIS's binary is never taken for Python


def test_standalone_windows_installer_without_base_prefix():
    """The standalone installer's layout is OSGeo4W's; from the executable alone."""
    exe = r"C:\Program Files\QGIS 3.40.6\bin\qgis-bin.exe"
    found = base_python_candidates("win32", (3, 12), exe, "", "", "")
    assert found[:2] == [r"C:\Program Files\QGIS 3.40.6\apps\Python312\python.exe",
                         r"C:\Program Files\QGIS 3.40.6\apps\Python312\python3.exe"]


def test_macos_bundle_finds_its_python():
    exe = "/Applications/QGIS-LTR.app/Contents/MacOS/QGIS"
    found = base_python_candidates("darwin", (3, 12), exe, "", "", "")
    assert found[0] == "/Applications/QGIS-LTR.app/Contents/MacOS/bin/python3.12"
    assert "/Applications/QGIS-LTR.app/Contents/MacOS/bin/python3" in found
    assert ("/Applications/QGIS-LTR.app/Contents/Frameworks/Python.framework/Versions/3.12/bin/python3"
            in found)


def test_macos_bundle_base_prefix_comes_first():
    prefix = "/Applications/QGIS.app/Contents/Frameworks/Python.framework/Versions/3.12"
    found = base_python_candidates("darwin", (3, 12), "/Applications/QGIS.app/Contents/MacOS/QGIS",
                                   "", prefix, prefix, ["/usr/local/bin/python3.12"])
    assert found[0] == f"{prefix}/bin/python3.12"
    assert found[-1] == "/usr/local/bin/python3.12"  # what is on PATH comes last


def test_linux_debian_qgis():
    found = base_python_candidates("linux", (3, 11), "/usr/bin/qgis", "", "/usr", "/usr")
    assert found[0] == "/usr/bin/python3.11"
    assert len(found) == len(set(found))


def test_a_python_executable_is_taken_first():
    found = base_python_candidates("linux", (3, 11), "/home/a/.venv/bin/python",
                                   "/usr/bin/python3.11", "/usr", "/home/a/.venv")
    assert found[:2] == ["/usr/bin/python3.11", "/home/a/.venv/bin/python"]


def test_find_base_python_from_a_qgis_like_layout(tmp_path, monkeypatch):
    """A real tree: <root>/bin/qgis (not Python) and <root>/bin/python3.X (a link to a real
    interpreter of this version): the Python is found and its version checked."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (tmp_path / "bin").mkdir()
    qgis = tmp_path / "bin" / "qgis"
    qgis.write_text("#!/bin/sh\nexit 1\n")
    python = tmp_path / "bin" / f"python{version}"
    os.symlink(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable, python)
    monkeypatch.setattr(sys, "executable", str(qgis))
    monkeypatch.setattr(sys, "_base_executable", str(qgis), raising=False)
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "nowhere"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "nowhere"))
    monkeypatch.setattr(environment.shutil, "which", lambda name: None)
    assert environment.find_base_python() == str(python)
    python.unlink()
    with pytest.raises(environment.DepsError, match=f"No Python {version} interpreter"):
        environment.find_base_python()


def test_managed_python_prefers_the_override_then_the_managed_env(tmp_path, monkeypatch):
    monkeypatch.delenv("GEOCHAT_RUNTIME_PYTHON", raising=False)
    env = ManagedEnv(tmp_path / "venv")
    assert managed_python(env) is None  # not installed
    env.python.parent.mkdir(parents=True)
    env.python.write_text("")
    assert managed_python(env) == str(env.python)
    monkeypatch.setenv("GEOCHAT_RUNTIME_PYTHON", "/opt/py/bin/python3")
    assert managed_python(env) == "/opt/py/bin/python3"


def test_an_environment_made_with_qgis_site_packages_is_not_isolated(tmp_path):
    env = ManagedEnv(tmp_path)
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    assert not env.isolated
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    assert env.isolated


def test_data_root_follows_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "deps"))
    assert ManagedEnv.default().path.parent == Path(tmp_path / "deps")
