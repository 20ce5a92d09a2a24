"""QGIS desktop start-up with the plugin enabled against without it (goal: within 0.2 s).

Two fresh profiles in one settings folder: one with the zip installed and enabled as the plugin
manager does, one without the plugin. Each run starts the real QGIS on a virtual display with
nothing of the checkout's environments visible, and stops it from its ``--code`` script, which
QGIS runs once the main window is up and every plugin has loaded; the time is from spawning
QGIS to that moment. Runs alternate between the two profiles; medians are compared.

    .venv-qgis/bin/python bench/qgis_startup.py [--runs 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import os, time
from qgis.PyQt.QtCore import QTimer

def _ready():
    import qgis.utils
    print("GEOCHAT-READY", repr(time.time()), "geochat_qgis" in qgis.utils.active_plugins, flush=True)
    os._exit(0)

QTimer.singleShot(0, _ready)
"""


def load_build():
    spec = importlib.util.spec_from_file_location("geochat_build", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_once(settings: Path, profile: str, script: Path, home: Path) -> tuple[float, bool]:
    """Seconds from spawning QGIS to its --code script, and whether the plugin was active."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "XDG_RUNTIME_DIR": str(home), "GEOCHAT_DEPS_DIR": str(home / "deps")}
    command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--nologo",
               "--noversioncheck", "--profiles-path", str(settings), "--profile", profile,
               "--code", str(script)]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        if line.startswith("GEOCHAT-READY"):
            _tag, stamp, active = line.split()
            return float(stamp) - started, active == "True"
    raise RuntimeError(f"QGIS did not reach its start-up script: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not shutil.which("qgis") or not shutil.which("xvfb-run"):
        print("needs qgis and xvfb-run (python3 build.py setup)", file=sys.stderr)
        return 1
    build = load_build()
    with tempfile.TemporaryDirectory(prefix="geochat-startup-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        build.DIST = base / "dist"
        build.install(build.package(), qgis_dir=base / "settings", profile="with")
        (base / "settings" / "profiles" / "without").mkdir(parents=True)
        script = base / "ready.py"
        script.write_text(SCRIPT, encoding="utf-8")
        times: dict[str, list[float]] = {"with": [], "without": []}
        # one warm-up each (first start writes the profile and QGIS's caches)
        for profile in ("with", "without"):
            (base / f"home-{profile}").mkdir()
            start_once(base / "settings", profile, script, base / f"home-{profile}")
        for run in range(args.runs):
            order = ("with", "without") if run % 2 == 0 else ("without", "with")
            for profile in order:
                seconds, active = start_once(base / "settings", profile, script, base / f"home-{profile}")
                if active != (profile == "with"):
                    raise RuntimeError(f"profile {profile}: plugin active={active}")
                times[profile].append(seconds)
    with_, without = statistics.median(times["with"]), statistics.median(times["without"])
    print(f"QGIS start-up, median of {args.runs}: with the plugin {with_:.2f} s, without "
          f"{without:.2f} s, difference {with_ - without:+.2f} s (goal <= +0.20 s)")
    print("runs with:    " + " ".join(f"{t:.2f}" for t in times["with"]))
    print("runs without: " + " ".join(f"{t:.2f}" for t in times["without"]))
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main())
