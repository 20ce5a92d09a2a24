"""``build.py test``: the test tiers (unit in .venv; qgis and installed in QGIS's Python), each
offscreen; a tier that ran no tests fails."""
from __future__ import annotations

import os
import subprocess
import time

from .common import QGIS_VENV_PYTHON, ROOT, VENV_PYTHON, say, shown
from .environments import NO_TORCH_REASON_ENV, setup, torch_reason_path


# (name, interpreter, folder, pytest flags, extra environment)
TIERS = [
    ("unit", VENV_PYTHON, "tests/unit", ["-p", "no:pytest_qgis"], {}),
    ("qgis", QGIS_VENV_PYTHON, "tests/qgis", [], {"GEOCHAT_RUNTIME_PYTHON": str(VENV_PYTHON)}),
    # the zip in a fresh profile of the real QGIS desktop, nothing of .venv visible
    ("installed", QGIS_VENV_PYTHON, "tests/installed", ["-p", "no:pytest_qgis"], {}),
]


def tier_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1", **extra)
    if torch_reason_path().exists():
        env[NO_TORCH_REASON_ENV] = torch_reason_path().read_text().strip()
    return env


def test(pytest_args: list[str]) -> int:
    setup()
    failed = []
    paths = [a for a in pytest_args if a.startswith("tests")]
    for name, python, tier_dir, tier_flags, extra in TIERS:
        tier_paths = [p for p in paths if p.startswith(tier_dir)]
        if paths and not tier_paths:
            continue  # the caller named tests of other tiers only
        options = [a for a in pytest_args if a not in paths]
        args = tier_flags + (tier_paths or [tier_dir]) + options
        say(f"test tier {name}: {shown(python)} -m pytest {' '.join(args)}")
        started = time.monotonic()
        code = subprocess.run([str(python), "-m", "pytest", *args], cwd=ROOT,
                              env=tier_env(extra)).returncode
        say(f"test tier {name}: pytest exit {code} ({time.monotonic() - started:.0f} s)")
        if code != 0:  # 5 = no tests collected: a failure too
            failed.append(f"{name} (pytest exit {code}{', no tests ran' if code == 5 else ''})")
    if failed:
        say("FAILED tiers: " + ", ".join(failed))
        return 1
    say("all test tiers passed")
    return 0
