"""Running pip with live output, and verifying installs by importing in a fresh process.

Everything goes into the managed environment's own interpreter, never into QGIS's Python.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..cancel import CancelToken
from ..errors import Cancelled
from . import DepsError
from .environment import LineFn, ManagedEnv, _no_window
from .requirements import CORE_IMPORTS, CORE_MODULE, BackendRequirements, PipStep

# the folder holding geochat_qgis/: on the verification's path, as on the runtime child's
PLUGIN_PARENT = Path(__file__).resolve().parents[3]

_PROBE = r"""
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        out[name] = {"ok": True, "version": str(getattr(module, "__version__", "") or ""),
                     "file": str(getattr(module, "__file__", "") or "")}
    except BaseException as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
print("GEOCHAT-PROBE " + json.dumps(out))
"""


@dataclass(frozen=True)
class ImportCheck:
    module: str
    ok: bool
    version: str = ""
    file: str = ""
    error: str = ""


# set by QGIS (or the OS) for QGIS's own Python and libraries; the runtime's wheels bring theirs
_QGIS_ONLY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "VIRTUAL_ENV",
              "__PYVENV_LAUNCHER__", "PROJ_LIB", "PROJ_DATA", "GDAL_DATA", "GDAL_DRIVER_PATH")


def clean_env(extra: Sequence[tuple[str, str]] = (), pythonpath: Sequence[str | Path] = ()
              ) -> dict[str, str]:
    """This process's environment without what would leak QGIS's own Python and library
    paths into the managed environment, plus ``extra`` and ``pythonpath``."""
    env = {k: v for k, v in os.environ.items() if k not in _QGIS_ONLY}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(dict(extra))
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return env


def run_pip(
    python: str | Path,
    args: Sequence[str],
    on_line: Optional[LineFn] = None,
    cancel: Optional["CancelToken"] = None,
    log_path: Optional[Path] = None,
    env: Sequence[tuple[str, str]] = (),
) -> None:
    """Run ``python -m pip ARGS``, passing each output line to ``on_line`` as it comes.

    DepsError with pip's own error lines when it fails; Cancelled (pip terminated) on cancel.
    """
    command = [str(python), "-m", "pip", *args, "--disable-pip-version-check", "--no-input",
               "--progress-bar", "off"]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        if log:
            log.write(f"\n$ {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, env=clean_env(env),
                                   **_no_window())
        watcher = _cancel_watcher(process, cancel)
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            tail.append(line)
            if log:
                log.write(line + "\n")
                log.flush()
            if on_line:
                on_line(line)
        code = process.wait()
        watcher.set()
        process.stdout.close()  # not left to the watcher thread's end (a ResourceWarning)
    finally:
        if log:
            log.close()
    if cancel is not None and cancel.cancelled:
        raise Cancelled("Installation cancelled; what pip finished installing stays.")
    if code != 0:
        errors = [line for line in tail if line.startswith("ERROR")] or list(tail)[-6:]
        raise DepsError(f"pip failed (exit code {code}): " + " | ".join(errors))


def _cancel_watcher(process: subprocess.Popen, cancel: Optional["CancelToken"]) -> threading.Event:
    """A thread that terminates ``process`` when ``cancel`` is set; set the event to stop it."""
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and process.poll() is None:
            if cancel is not None and cancel.cancelled:
                process.terminate()
                return
            time.sleep(0.2)

    if cancel is not None:
        threading.Thread(target=watch, daemon=True).start()
    return done


def probe_imports(python: str | Path, modules: Sequence[str], timeout: float = 300.0,
                  pythonpath: Sequence[str | Path] = ()) -> list[ImportCheck]:
    """Import ``modules`` in a fresh ``python`` process (``pythonpath`` its only extra path);
    one check per module.

    A native crash while importing (a broken wheel) marks every module failed with the signal.
    """
    if not modules:
        return []
    try:
        # cwd: `python -c` puts it first on sys.path (QGIS's own folder may hold anything)
        result = subprocess.run([str(python), "-c", _PROBE, *modules], capture_output=True,
                                text=True, timeout=timeout, env=clean_env(pythonpath=pythonpath),
                                cwd=str(Path(python).parent), **_no_window())
    except (OSError, subprocess.SubprocessError) as exc:
        return [ImportCheck(m, False, error=f"could not run {python}: {exc}") for m in modules]
    for line in result.stdout.splitlines():
        if line.startswith("GEOCHAT-PROBE "):
            data = json.loads(line[len("GEOCHAT-PROBE "):])
            return [ImportCheck(m, **data[m]) for m in modules]
    reason = f"the import process ended with code {result.returncode}: {result.stderr[-500:]}"
    return [ImportCheck(m, False, error=reason) for m in modules]


def install_packages(
    env: ManagedEnv,
    step: PipStep,
    on_line: Optional[LineFn] = None,
    cancel: Optional["CancelToken"] = None,
) -> None:
    """Create ``env`` if needed and pip-install one step into it."""
    env.create(on_line=on_line)
    # a wheel where one exists beats compiling a newer release from source
    run_pip(env.python, [*step.pip_args(), "--prefer-binary"], on_line, cancel, env.log_path,
            step.env)


def install_backend(
    env: ManagedEnv,
    requirements: BackendRequirements,
    on_line: Optional[LineFn] = None,
    cancel: Optional["CancelToken"] = None,
) -> list[ImportCheck]:
    """Install every step of ``requirements`` and verify its imports in a fresh process; when
    the core's packages are among them, the core itself (``geochat_qgis.core.pipeline``, the
    plugin's parent folder on the path) must import there too."""
    for step in requirements.steps:
        install_packages(env, step, on_line, cancel)
    modules = list(requirements.imports)
    if set(CORE_IMPORTS) <= set(modules):
        modules.append(CORE_MODULE)
    if on_line:
        on_line(f"Verifying: import {', '.join(modules)} in a fresh process")
    checks = probe_imports(env.python, modules, pythonpath=[PLUGIN_PARENT])
    failed = [c for c in checks if not c.ok]
    if failed:
        raise DepsError(
            f"{requirements.backend} was installed but does not import: "
            + "; ".join(f"{c.module}: {c.error}" for c in failed)
            + ". Copy the diagnostics (`python -m geochat_qgis deps diagnostics`) into a bug report."
        )
    return checks
