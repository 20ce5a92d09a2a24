"""The real QGIS desktop application: its environment, the ``--code`` start-up script harness,
and ``build.py run`` (the plugin with the demo raster, headless on Xvfb when there is no
display)."""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

from .common import OUT, PACKAGE, ROOT, VENV_PYTHON, BuildError, say, shown
from .packaging import install

DEMO_RASTER = ROOT / "resources" / "demo" / "cogeo.tif"


def qgis_env(headless: bool) -> dict[str, str]:
    """The environment QGIS runs in: nothing of .venv on its path (QGIS's process holds only
    QGIS and the plugin's Qt code); the plugin's runtime child runs .venv's Python.

    QGIS's embedded Python finds its prefix from the first ``python3`` on PATH: a pyenv or other
    interpreter there makes it lose the qgis module, so Debian's /usr/bin comes first.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "QT_QPA_PLATFORM")}
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin", env.get("PATH", "")])
    env["GEOCHAT_RUNTIME_PYTHON"] = str(VENV_PYTHON)
    if headless:
        env["GEOCHAT_DEMO_HEADLESS"] = "1"
    return env


def startup_script(body: str, headless: bool, settle_ms: int = 3000, timeout_s: int = 240) -> str:
    """Python QGIS runs once started (``--code``).

    ``body`` defines ``main(iface)``, run after the window has settled; it may return a
    ``step()`` callable, polled until it returns True. Headless, QGIS then quits; an exception
    is printed (a Python error dialog would block a virtual display forever) and QGIS exits
    with status 1.
    """
    return textwrap.dedent(
        """
        import os, sys, time, traceback
        from qgis.core import QgsProject
        from qgis.PyQt.QtCore import QTimer
        from qgis.utils import iface
        """
    ) + textwrap.dedent(body) + textwrap.dedent(
        f"""

        def _geochat_fail():
            print("GEOCHAT-RUN-ERROR", traceback.format_exc(), flush=True)
            if {headless!r}:
                os._exit(1)

        def _geochat_done():
            if {headless!r}:
                # nobody is there to answer "save?" or "temporary layers will be lost"
                QgsProject.instance().clear()
                QgsProject.instance().setDirty(False)
                iface.mainWindow().close()

        def _geochat_poll(step, deadline):
            try:
                finished = step()
            except Exception:
                return _geochat_fail()
            if finished:
                return _geochat_done()
            if time.monotonic() > deadline:
                print("GEOCHAT-RUN-ERROR the run did not finish in {timeout_s} s", flush=True)
                if {headless!r}:
                    os._exit(1)
                return
            QTimer.singleShot(250, lambda: _geochat_poll(step, deadline))

        def _geochat_run():
            try:
                step = main(iface)
            except Exception:
                return _geochat_fail()
            if step is None:
                return _geochat_done()
            _geochat_poll(step, time.monotonic() + {timeout_s})

        QTimer.singleShot({settle_ms}, _geochat_run)
        """
    )


def demo_body(raster: Path, out: Path) -> str:
    """Load the raster, open the dock, find objects with the demo model, save what it shows."""
    return f"""
        def main(iface):
            from pathlib import Path
            from qgis.utils import plugins
            from {PACKAGE}.gui.demo import start_demo

            return start_demo(iface, plugins[{PACKAGE!r}], Path({str(raster)!r}), Path({str(out)!r}))
        """


def run_qgis(
    qgis_dir: Path, profile: str, script: str, headless: bool, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Start the real QGIS desktop application with a profile; QGIS runs ``script`` once started.

    Headless (no display) it runs on Xvfb, captures its output and is killed after ``timeout``.
    """
    OUT.mkdir(exist_ok=True)
    script_path = OUT / f"qgis_startup_{os.getpid()}.py"
    script_path.write_text(script, encoding="utf-8")
    command = [
        "qgis", "--nologo", "--noversioncheck",
        "--profiles-path", str(qgis_dir), "--profile", profile, "--code", str(script_path),
    ]
    if headless:
        if not shutil.which("xvfb-run"):
            raise BuildError("no display and no xvfb-run: run `python3 build.py setup` (installs xvfb)")
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"] + command
    say("starting QGIS: " + " ".join(command[command.index("qgis"):]))
    try:
        return subprocess.run(
            command, env=qgis_env(headless), timeout=timeout if headless else None,
            capture_output=headless, text=True,
        )
    except subprocess.TimeoutExpired as exc:
        output = "\n".join(str(part or "") for part in (exc.stdout, exc.stderr))
        raise BuildError(f"QGIS did not finish within {timeout:.0f} s and was stopped. "
                         f"What it printed:\n{output[-4000:]}") from exc
    finally:
        script_path.unlink(missing_ok=True)


def run(plugin_zip: Path, qgis_dir: Path, profile: str) -> int:
    """Install ``plugin_zip`` into the profile and start QGIS with it and the demo raster."""
    install(plugin_zip, qgis_dir, profile)
    headless = not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
    screenshot = OUT / "qgis_main_window.png"
    screenshot.unlink(missing_ok=True)
    result = run_qgis(qgis_dir, profile, startup_script(demo_body(DEMO_RASTER, OUT), headless), headless)
    if headless:
        output = result.stdout + result.stderr
        failed = result.returncode != 0 or not screenshot.exists() or "GEOCHAT-RUN-ERROR" in output
        for line in output.splitlines():
            if failed or line.startswith("GEOCHAT-RUN"):
                print(line)
        if failed:
            raise BuildError("the QGIS run failed: see its output above")
        say(f"no display: ran QGIS on a virtual display, loaded {DEMO_RASTER.name}, opened the "
            f"GeoChat dock, ran a detection and saved {shown(screenshot)} and the result layer")
    return result.returncode
