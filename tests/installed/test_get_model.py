"""Getting models in the plugin as a user installs it: the zip in a fresh profile of the real
QGIS desktop (no PYTHONPATH, nothing of the checkout's environments), the managed runtime the
plugin's installer built (test_as_installed.py runs first and installs it), a hub on 127.0.0.1.

In that QGIS the dock's Get dialog (opened as its Get... button opens it):
- plans and gets GeoChat-7B with the managed llama.cpp runtime, which has no torch: the .bin
  shards are read with numpy, nothing more is offered for installing;
- gets a model the user catalog lists (a GGUF pair served by the hub) to the end: progress,
  ready; a find-objects run with it gives features that carry its provenance (repository,
  commit, file hash), and QGIS's process imports no core package throughout.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from installed_env import FORBIDDEN, ROOT, needs_qgis
from qgis_session import plugin_problems, run_session

sys.path.insert(0, str(ROOT / "tests" / "unit"))
from hub_repos import CLIP_REPO, GEOCHAT_REPO, serve_repo_hub  # noqa: E402

TIMEOUT = 600
REPO, COMMIT = "team/tiny-geochat", "b" * 40

SESSION = r'''
def main(iface):
    import json
    from pathlib import Path
    import qgis.utils
    from qgis.core import QgsProject, QgsVectorLayer

    config = json.loads(CONFIG)
    report = {"phase": "start", "errors": {}}

    def save():
        Path(config["report"]).write_text(json.dumps(report, indent=1), encoding="utf-8")

    def heavy():
        return sorted(m for m in config["forbidden"] if m in sys.modules)

    from geochat_qgis.client import shared_client
    from geochat_qgis.gui import model_choice
    from geochat_qgis.gui.get_model_dialog import open_get_dialog

    client = shared_client()
    report["active"] = "geochat_qgis" in qgis.utils.active_plugins
    report["runtime_torch"] = client.status()["versions"].get("torch")
    rows = model_choice.fetch_rows(client)
    report["listed"] = [r["name"] for r in rows]
    ready = []
    geochat = open_get_dialog("geochat-7b", "", None, ready.append)
    state = {"phase": "plan geochat", "dialog": geochat}
    report["phase"] = state["phase"]
    save()

    def step():
        dialog = state["dialog"]
        if "Checking" in dialog.plan_label.text() or dialog.busy:
            return False
        phase = state["phase"]
        if phase == "plan geochat":
            report["geochat_takes"] = dialog.takes_label.text()
            report["geochat_plan"] = dialog.plan_label.text()
            report["install_offered"] = not dialog.install_button.isHidden()
            dialog.get_button.click()
            state["phase"] = report["phase"] = "get geochat"
        elif phase == "get geochat":
            report["geochat_status"] = dialog.status_label.text()
            report["geochat_got"] = dialog.result is not None
            dialog.close()
            state["dialog"] = open_get_dialog("team-tiny", "", None, ready.append)
            state["phase"] = report["phase"] = "plan team-tiny"
        elif phase == "plan team-tiny":
            report["tiny_plan"] = dialog.plan_label.text()
            dialog.get_button.click()
            state["phase"] = report["phase"] = "get team-tiny"
        elif phase == "get team-tiny":
            report["tiny_status"] = dialog.status_label.text()
            report["bars"] = {p: [bar.value(), text.text()] for p, (text, bar) in dialog.bars.items()}
            report["ready"] = list(ready)
            dialog.close()
            model_choice.fetch_rows(client)
            settings = type("S", (), dict(backend="llama.cpp", threads=2, gpu_layers=-1, device="auto",
                                          cache_dir="", mmproj="", server_url="", server_model=""))()
            report["status"] = list(model_choice.model_status("team-tiny", settings))
            ran = client.run({"raster": config["raster"], "task": "refer", "prompts": ["car"],
                              "model": model_choice.model_request("team-tiny", settings),
                              "tiling": {"tile_size": 504, "overlap": 0},
                              "options": {"max_new_tokens": 30, "grammar": True},
                              "output": {"path": config["output"], "layer": "cars"}})
            layer = QgsVectorLayer(f"{ran.output}|layername={ran.layer}", "GeoChat cars", "ogr")
            QgsProject.instance().addMapLayer(layer)
            report["run"] = {"features": ran.features, "valid": layer.isValid(),
                             "fields": [f.name() for f in layer.fields()],
                             "values": [{n: f[n] for n in ("model_src", "model_rev", "model_hash")}
                                        for f in layer.getFeatures()]}
            report["heavy_modules"] = heavy()
            state["phase"] = report["phase"] = "done"
            save()
            return True
        save()
        return False

    return step
'''


def tiny_models(folder: Path) -> tuple[Path, Path, Path]:
    """The tiny GeoChat and CLIP-336 repositories and a tiny GGUF pair, written by the
    checkout's .venv (numpy, sentencepiece, gguf; QGIS never sees it)."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("needs the checkout's .venv to write the tiny GeoChat checkpoint")
    script = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
              " from hub_repos import tiny_geochat_repos; tiny_geochat_repos(Path(sys.argv[2]));"
              " from geochat_qgis.core.weights.demo_gguf import write_demo_gguf;"
              " write_demo_gguf(Path(sys.argv[2]) / 'gguf', seed=0)")
    done = subprocess.run([str(python), "-c", script, str(ROOT / "tests" / "unit"), str(folder)],
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "geochat-7B", folder / "clip-vit-large-patch14-336", folder / "gguf"


@pytest.fixture(scope="module")
def session(installed, tmp_path_factory) -> dict:
    if not installed.deps_dir.exists():
        pytest.skip("needs the managed runtime test_as_installed.py installs (run the whole tier)")
    base = tmp_path_factory.mktemp("get-model")
    catalog = base / "catalog.json"
    catalog.write_text(json.dumps({"models": [{
        "name": "team-tiny", "title": "Team tiny GeoChat", "family": "geochat", "format": "gguf",
        "repo": REPO, "revision": "main", "backends": ["llama.cpp"],
        "files": [{"path": "model.gguf", "role": "model"}, {"path": "mmproj.gguf", "role": "mmproj"}],
    }]}), encoding="utf-8")
    generator = serve_repo_hub()
    hub = next(generator)
    geochat, clip, gguf = tiny_models(base / "repos")
    hub.add_folder(REPO, gguf, commit=COMMIT)
    hub.add_folder(GEOCHAT_REPO, geochat, commit="a" * 40)
    hub.add_folder(CLIP_REPO, clip, commit="c" * 40)
    config = {"report": str(base / "report.json"), "forbidden": list(FORBIDDEN),
              "raster": str(ROOT / "resources" / "demo" / "cogeo.tif"),
              "output": str(base / "cars.gpkg")}
    try:
        session = run_session(installed, config, "get", TIMEOUT, SESSION,
                              GEOCHAT_HF_ENDPOINT=hub.url, GEOCHAT_USER_CATALOG=str(catalog),
                              GEOCHAT_CACHE=str(base / "models"))
    finally:
        requests = list(hub.requests)
        generator.close()
    return {**session, "requests": requests, "gguf": gguf}


def explain(session: dict) -> str:
    return (f"QGIS exit {session['code']}\n{json.dumps(session['report'], indent=1)[-4000:]}\n"
            f"--- QGIS output ---\n{session['output'][-3000:]}")


@needs_qgis
def test_geochat_7b_is_listed_and_got_without_torch(session):
    """The managed llama.cpp runtime has no torch and converts GeoChat all the same (issue 25):
    nothing to install, the shards downloaded and the GGUF pair made."""
    report = session["report"]
    assert report.get("phase") == "done", explain(session)
    assert "geochat-7b" in report["listed"] and "team-tiny" in report["listed"]
    assert "gguf q4_k_m" in report["geochat_takes"] and "GB" in report["geochat_takes"]
    assert not report["runtime_torch"], "the managed llama.cpp runtime installed torch"
    assert "Converting needs" not in report["geochat_plan"] and not report["install_offered"]
    assert report["geochat_got"], report["geochat_status"]
    assert [r for r in session["requests"] if "geochat-7B" in r[1] and r[1].endswith(".bin")]


@needs_qgis
def test_get_ends_ready_and_the_run_carries_provenance(session):
    report = session["report"]
    assert report.get("phase") == "done", explain(session)
    assert "team-tiny" in report["ready"], report["tiny_status"]  # (geochat-7b: the test above)
    assert report["bars"]["download"][0] == 1000 and " of " in report["bars"]["download"][1]
    assert report["status"][0] == "ready", report["status"]
    run = report["run"]
    assert run["valid"] and run["features"] > 0 and len(run["values"]) == run["features"]
    digest = hashlib.sha256((session["gguf"] / "model.gguf").read_bytes()).hexdigest()
    assert {json.dumps(v, sort_keys=True) for v in run["values"]} == {json.dumps(
        {"model_src": REPO, "model_rev": COMMIT, "model_hash": digest}, sort_keys=True)}
    assert report["heavy_modules"] == [], "core packages were imported into QGIS"
    assert plugin_problems(session["events"]) == [], explain(session)
    assert session["code"] == 0, explain(session)
