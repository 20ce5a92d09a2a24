"""The scripts the real QGIS desktop runs in the "as installed" tier, and how it is started.

``STARTUP`` runs before any plugin loads (PYQGIS_STARTUP): it records every QgsMessageLog
message and every Python error QGIS would show (qgis.utils.showException: the error window) in
a JSON-lines file. ``SESSION`` is the user's session, step by step (``--code``, polled from a
timer): the plugin loaded, the dock, the installer, a find-objects run, unload and reload.
Each step writes what it saw into a JSON report the tests read.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from installed_env import load_build

STARTUP = r'''
import json, os, sys, time
from qgis.core import QgsApplication

_EVENTS = os.environ["GEOCHAT_TEST_EVENTS"]


def _record(kind, **data):
    with open(_EVENTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(dict(kind=kind, time=time.time(), **data)) + "\n")


_record("startup", modules=sorted(sys.modules))
QgsApplication.messageLog().messageReceived.connect(
    lambda message, tag, level: _record("log", tag=tag, level=int(level), message=message))

import qgis.utils  # noqa: E402


def _shown(type_=None, value=None, tb=None, msg=None, *args, **kwargs):
    import traceback
    text = "".join(traceback.format_exception(type_, value, tb)) if type_ else ""
    _record("python_error", message=str(msg or ""), traceback=text)


qgis.utils.showException = _shown  # recorded, not shown: nobody is there to close a window
'''

SESSION = r'''
def main(iface):
    import json, os, subprocess
    from pathlib import Path
    import qgis.utils
    from qgis.core import QgsApplication, QgsVectorLayer
    from qgis.PyQt.QtCore import QCoreApplication, QEvent
    from qgis.PyQt.QtWidgets import QAction, QDockWidget, QWidget

    config = json.loads(CONFIG)
    name = "geochat_qgis"
    report = {"phase": "loaded"}

    def save():
        Path(config["report"]).write_text(json.dumps(report, indent=1), encoding="utf-8")

    def runtime_children():
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit():
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if config["deps_dir"] in cmdline and " pip " not in cmdline:
                    found.append(cmdline.strip())
            except OSError:
                pass
        return found

    def texts(widget):
        out = []
        for child in [widget] + widget.findChildren(QWidget):
            for getter in ("text", "toPlainText", "placeholderText", "toolTip"):
                try:
                    value = getattr(child, getter)()
                except (AttributeError, TypeError, RuntimeError):
                    continue
                if isinstance(value, str) and value.strip() and child.isVisibleTo(widget):
                    out.append(value)
        return out

    def qgis_side():
        window = iface.mainWindow()
        return {
            "actions": sorted(a.objectName() for a in window.findChildren(QAction)
                              if a.objectName().startswith("GeoChat")),
            "docks": len([d for d in window.findChildren(QDockWidget, "GeoChatDock")]),
            "provider": QgsApplication.processingRegistry().providerById("geochat") is not None,
            "children": runtime_children(),
        }

    plugin = qgis.utils.plugins.get(name)
    report["active"] = name in qgis.utils.active_plugins
    report["loaded"] = qgis_side()
    report["heavy_modules"] = sorted(m for m in config["forbidden"] if m in sys.modules)
    report["errors"] = {}
    save()
    try:
        plugin.show_dock()
        QCoreApplication.processEvents()
        report["dock_text"] = texts(plugin.dock)
    except Exception:
        import traceback
        report["errors"]["dock"] = traceback.format_exc()[-3000:]
    report["heavy_modules_after_dock"] = sorted(m for m in config["forbidden"] if m in sys.modules)
    save()

    plugin.deps_action.trigger()  # Raster > GeoChat > Install model dependencies...
    dialog = plugin.deps_dialog
    report["installer"] = {"packages": dialog.packages_label.text(), "size": dialog.size_label.text(),
                           "where": dialog.where_label.text()}
    dialog.install_button.click()
    state = {"phase": "installing", "started": time.monotonic(), "demo": None, "waits": 0}
    report["phase"] = "installing"
    save()

    def step():
        phase = state["phase"]
        if phase == "installing":
            if dialog.running:
                return False
            report["installer"].update(
                installed=dialog.installed, status=dialog.status_label.text(),
                seconds=round(time.monotonic() - state["started"], 1),
                checks=[[c.module, c.version, c.file] for c in dialog.checks],
                log_tail=dialog.log_view.toPlainText().splitlines()[-15:])
            du = subprocess.run(["du", "-sm", config["deps_dir"]], capture_output=True, text=True)
            report["installer"]["env_mb"] = int(du.stdout.split()[0]) if du.returncode == 0 else None
            dialog.close()
            save()
            if not dialog.installed:
                report["phase"] = "install failed"
                save()
                return True
            try:
                from geochat_qgis.gui.demo import start_demo
                state["demo"] = start_demo(iface, plugin, Path(config["raster"]), Path(config["out"]))
            except Exception:
                import traceback
                report["errors"]["demo"] = traceback.format_exc()[-3000:]
                report["phase"] = "demo failed"
                save()
                return True
            state["phase"] = report["phase"] = "demo"
            save()
            return False
        if phase == "demo":
            if not state["demo"]():
                return False
            project = QgsProject.instance()
            report["project_crs"] = project.crs().authid()
            report["result_layers"] = [
                {"name": layer.name(), "crs": layer.crs().authid(), "features": layer.featureCount(),
                 "renderer": layer.renderer().type() if layer.renderer() else None,
                 "source": layer.source(), "fields": [f.name() for f in layer.fields()]}
                for layer in project.mapLayers().values() if isinstance(layer, QgsVectorLayer)]
            report["after_run"] = qgis_side()
            report["heavy_modules_after_run"] = sorted(m for m in config["forbidden"] if m in sys.modules)
            report["unloaded"] = qgis.utils.unloadPlugin(name)
            QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
            state["phase"] = report["phase"] = "unloaded"
            save()
            return False
        if phase == "unloaded":
            side = qgis_side()
            if side["children"] and state["waits"] < 40:  # a child gets 10 s to exit
                state["waits"] += 1
                return False
            report["after_unload"] = side
            report["reloaded"] = bool(qgis.utils.loadPlugin(name) and qgis.utils.startPlugin(name))
            qgis.utils.plugins[name].show_dock()
            QCoreApplication.processEvents()
            report["after_reload"] = qgis_side()
            report["phase"] = "done"
            save()
            return True
        return True

    return step
'''


def session_script(build, config: dict, timeout_s: int, body: str = SESSION) -> str:
    """The ``--code`` file's text: build.py's headless harness around ``body`` (SESSION)."""
    prefix = f"import sys\nCONFIG = {json.dumps(json.dumps(config))}\n"
    return build.startup_script(prefix + body, headless=True, settle_ms=2000, timeout_s=timeout_s)


def start_qgis(installed, script: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """The real QGIS desktop on a virtual display with the fresh profile; killed after
    ``timeout`` (TimeoutExpired)."""
    path = installed.base / "session.py"
    path.write_text(script, encoding="utf-8")
    command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", shutil.which("qgis") or "qgis",
               "--nologo", "--noversioncheck", "--profiles-path", str(installed.qgis_dir),
               "--profile", "default", "--code", str(path)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plugin_problems(events: list[dict]) -> list[str]:
    """Python errors QGIS would have shown, and warnings or errors logged about the plugin."""
    problems = []
    for event in events:
        if event["kind"] == "python_error":
            problems.append(f"Python error window: {event['message']} {event['traceback'][-1500:]}")
        elif event["kind"] == "log" and event["level"] in (1, 2):  # Qgis.Warning, Qgis.Critical
            text = f"{event['tag']}: {event['message']}"
            if "python" in event["tag"].lower() or "geochat" in text.lower():
                problems.append(f"log {text[:1500]}")
    return problems


def run_session(installed, config: dict, name: str, timeout_s: int, body: str = SESSION,
                **env: str) -> dict:
    """Run a session script (``body`` defines ``main(iface)``, reads CONFIG, writes the report
    named in ``config["report"]``) in the real QGIS with the fresh profile and ``env`` added:
    its report, events, output, exit code and the runtime processes left after it."""
    events = installed.base / f"events-{name}.jsonl"
    startup = installed.base / f"startup-{name}.py"
    startup.write_text(STARTUP, encoding="utf-8")
    env = installed.env(PYQGIS_STARTUP=str(startup), GEOCHAT_TEST_EVENTS=str(events), **env)
    try:
        result = start_qgis(installed, session_script(load_build(), config, timeout_s, body), env,
                            timeout=timeout_s + 120)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
    path = Path(config["report"])
    report = json.loads(path.read_text()) if path.exists() else {}
    return {"report": report, "events": read_events(events), "code": code, "output": str(output),
            "orphans": installed.runtime_processes_after(20)}
