"""Fixtures of the "as installed" tier (helpers in installed_env.py)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from installed_env import ROOT, Installed


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    return Installed(tmp_path_factory.mktemp("as-installed"))


@pytest.fixture(scope="session")
def demo_model(installed) -> Path:
    """The tiny demo GGUF in the user's model cache. Built here with .venv's torch: the managed
    llama.cpp runtime has no torch, and the demo model's builder (core/weights/tiny.py) needs it."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    code = ("import sys; from geochat_qgis.core.weights.demo import demo_model_dir; "
            "print(demo_model_dir(sys.argv[1]))")
    done = subprocess.run([str(venv_python), "-c", code, str(installed.cache)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])
