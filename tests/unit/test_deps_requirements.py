"""The installer's runtime and requirements.txt agree; the core imports in a fresh process of
the runtime's interpreter with nothing but the plugin's parent folder on its path."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from geochat_qgis.core.deps.pip import PLUGIN_PARENT, clean_env, probe_imports
from geochat_qgis.core.deps.requirements import CORE, CORE_IMPORTS, CORE_MODULE, LLAMA_CPP

ROOT = Path(__file__).resolve().parents[2]


def requirement_names(path: Path) -> dict[str, str]:
    names = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0].lower().replace("_", "-")
            names[name] = line
    return names


def test_requirements_txt_holds_the_installers_core_and_llama_cpp():
    listed = requirement_names(ROOT / "requirements.txt")
    missing = [p for p in CORE if p.lower().replace("_", "-") not in listed]
    assert not missing, f"requirements.txt lacks the runtime's core packages {missing}"
    assert listed["llama-cpp-python"] == LLAMA_CPP.replace("llama-cpp-python", "llama-cpp-python[server]")


def test_no_pin_left_from_sharing_qgiss_process():
    text = (ROOT / "requirements.txt").read_text()
    for pin in ("numpy<2", "shapely>=2.0,<2.1", "attrs>=23.2"):
        assert pin not in requirement_names(ROOT / "requirements.txt").values(), pin
    assert "--no-deps" not in text


def test_the_core_imports_in_a_fresh_runtime_process():
    checks = probe_imports(sys.executable, [*CORE_IMPORTS, CORE_MODULE], pythonpath=[PLUGIN_PARENT])
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    core = checks[-1]
    assert Path(core.file).is_relative_to(PLUGIN_PARENT / "geochat_qgis")


def test_qgiss_paths_never_reach_the_runtime(monkeypatch):
    monkeypatch.setenv("PYTHONHOME", "/opt/qgis/apps/Python312")
    monkeypatch.setenv("PYTHONPATH", "/usr/share/qgis/python")
    monkeypatch.setenv("PROJ_LIB", "/usr/share/proj")
    env = clean_env(pythonpath=[PLUGIN_PARENT])
    assert "PYTHONHOME" not in env and "PROJ_LIB" not in env
    assert env["PYTHONPATH"] == str(PLUGIN_PARENT) and env["PYTHONNOUSERSITE"] == "1"


def test_the_verification_ignores_the_callers_folder(tmp_path, monkeypatch):
    """QGIS's working folder may hold another geochat_qgis (a checkout): the check imports the
    plugin's own, from the path it is given."""
    decoy = tmp_path / "geochat_qgis"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy in the working folder')\n")
    monkeypatch.chdir(tmp_path)
    (check,) = probe_imports(sys.executable, ["geochat_qgis"], pythonpath=[PLUGIN_PARENT])
    assert check.ok, check.error
    assert Path(check.file).parent == PLUGIN_PARENT / "geochat_qgis"
