"""The plugin as a user installs and uses it: the zip in a fresh profile of the real QGIS
desktop, nothing of the project's environments visible, the runtime installed by the plugin's
own installer from nothing, a find-objects run, qgis_process, unload and reload, quitting."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from installed_env import FORBIDDEN, ROOT, needs_qgis
from qgis_session import plugin_problems, run_session

SESSION_TIMEOUT = 1500  # the install compiles nothing when pip's cache has llama-cpp-python
QGIS_PROCESS = shutil.which("qgis_process.bin") or shutil.which("qgis_process")


@pytest.fixture(scope="module")
def session(installed) -> dict:
    """One user session in QGIS; its report, events, output and exit code."""
    config = {"report": str(installed.base / "report.json"), "deps_dir": str(installed.deps_dir),
              "raster": str(ROOT / "resources" / "demo" / "cogeo.tif"), "out": str(installed.out),
              "forbidden": list(FORBIDDEN)}
    return run_session(installed, config, "user", SESSION_TIMEOUT)


def explain(session: dict) -> str:
    report = {k: v for k, v in session["report"].items() if k != "dock_text"}
    return (f"QGIS exit {session['code']}, phase {report.get('phase')}\n"
            f"{json.dumps(report, indent=1)[-4000:]}\n--- QGIS output ---\n{session['output'][-3000:]}")


@needs_qgis
def test_plugin_loads_with_no_python_error_and_no_core_package(session):
    report = session["report"]
    assert report.get("active") is True, explain(session)
    assert plugin_problems(session["events"]) == [], explain(session)
    assert report["loaded"]["provider"] and "GeoChatToggleDock" in report["loaded"]["actions"]
    assert report["loaded"]["children"] == []  # no runtime child at start-up
    assert report["heavy_modules"] == [] and report["heavy_modules_after_dock"] == []


@needs_qgis
def test_dock_says_the_runtime_is_missing(session):
    assert "dock" not in session["report"].get("errors", {"dock": "no report"}), session["report"]["errors"]
    text = " ".join(session["report"].get("dock_text", []))
    assert "runtime" in text.lower() and "not installed" in text.lower(), text[:3000]


@needs_qgis
def test_installer_builds_the_runtime_from_nothing_and_verifies_it(session, installed):
    installer = session["report"].get("installer", {})
    assert installer.get("installed") is True, explain(session)
    modules = {module: path for module, _version, path in installer["checks"]}
    for module in ("numpy", "rasterio", "shapely", "pyproj", "pyogrio", "llama_cpp",
                   "geochat_qgis.core.pipeline"):
        assert module in modules, installer
    # into the managed environment, never QGIS's Python; the core from the installed plugin
    assert all(Path(p).is_relative_to(installed.deps_dir) for m, p in modules.items()
               if m not in ("geochat_qgis.core.pipeline",) and p), modules
    assert Path(modules["geochat_qgis.core.pipeline"]).is_relative_to(installed.plugin_dir)
    assert "rasterio" in installer["packages"] and "llama-cpp-python" in installer["packages"]
    print(f"installer: {installer['seconds']} s, environment {installer['env_mb']} MB")


@needs_qgis
def test_find_objects_adds_a_styled_layer_in_the_project_crs(session):
    report = session["report"]
    assert report.get("phase") == "done", explain(session)
    results = [layer for layer in report["result_layers"] if layer["source"].split("|")[0].endswith(".gpkg")]
    assert results, report["result_layers"]
    layer = results[-1]
    assert layer["crs"] == report["project_crs"]
    assert layer["renderer"] in ("categorizedSymbol", "singleSymbol", "graduatedSymbol", "RuleRenderer")
    assert {"label", "task", "model"} <= set(layer["fields"])
    assert report["after_run"]["children"], "the run's runtime child should be alive after the run"
    assert report["heavy_modules_after_run"] == [], "core packages were imported into QGIS"


@needs_qgis
def test_unload_and_reload_leave_nothing_behind(session):
    report = session["report"]
    assert report.get("unloaded") is True, explain(session)
    after = report["after_unload"]
    assert after == {"actions": [], "docks": 0, "provider": False, "children": []}, after
    assert report["reloaded"] is True
    assert report["after_reload"]["provider"] and report["after_reload"]["docks"] == 1


@needs_qgis
def test_qgis_quits_without_a_prompt_or_an_orphan(session):
    assert session["code"] == 0, explain(session)
    assert session["orphans"] == []


def gpkg_features(path: Path) -> tuple[str, int]:
    """(layer name, feature count) of a GeoPackage, read with sqlite3 alone."""
    with sqlite3.connect(path) as db:
        (table,) = db.execute("SELECT table_name FROM gpkg_contents WHERE data_type='features'").fetchone()
        (count,) = db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return table, count


@pytest.mark.skipif(QGIS_PROCESS is None, reason="qgis_process is not installed")
@needs_qgis
def test_qgis_process_detect_writes_a_geopackage(session, installed, demo_model, tmp_path):
    assert session["report"].get("installer", {}).get("installed"), "needs the installed runtime"
    output = tmp_path / "detections.gpkg"
    env = installed.env(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(installed.qgis_dir))
    # the demo raster is EPSG:3857; one 200-pixel tile from its top-left corner
    run = subprocess.run(
        [QGIS_PROCESS, "--json", "run", "geochat:detect", "--",
         f"INPUT={ROOT / 'resources' / 'demo' / 'cogeo.tif'}", "PROMPT=car", f"MODEL={demo_model}",
         "BACKEND=llama.cpp", "MAX_NEW_TOKENS=24", f"OUTPUT={output}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.stdout.strip(), run.stderr[-3000:]
    results = json.loads(run.stdout)["results"]
    assert results["OUTPUT"] == str(output) and output.exists(), run.stderr[-3000:]
    _table, count = gpkg_features(output)
    assert count == results["DETECTIONS"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert installed.runtime_processes_after(20) == []
