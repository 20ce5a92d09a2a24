"""The "Copy diagnostics" report: versions, paths (home folder redacted), GPU, last errors."""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ...__about__ import version
from .environment import ManagedEnv, data_root, platform_tag, runtime_python
from .gpu import nvidia_gpus
from .pip import probe_imports
from .requirements import BACKENDS, requirements_for

ERROR_LINES = 20


def redact(text: str) -> str:
    """``text`` with the user's home folder replaced by ``~``."""
    home = str(Path.home())
    return text.replace(home, "~") if home not in ("", "/") else text


def errors_log() -> Path:
    """Where runtime failures are recorded for the diagnostics."""
    return data_root() / "errors.log"


def record_error(message: str, keep: int = 200) -> None:
    """Append one failure (time-stamped) to the errors log, keeping its last ``keep`` lines."""
    path = errors_log()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(message.split())}")
        path.write_text("\n".join(lines[-keep:]) + "\n", encoding="utf-8")
    except OSError:
        pass  # diagnostics must never be the reason something fails


def _tail(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def last_errors(env: ManagedEnv, count: int = ERROR_LINES) -> list[str]:
    """The last runtime failures and install-log errors (else the install log's last lines)."""
    lines = _tail(env.log_path)
    errors = [line for line in lines if "ERROR" in line or "Error" in line] or lines
    return (_tail(errors_log()) + errors)[-count:]


def backend_status(backend: str, python: str) -> dict[str, Any]:
    """Whether ``backend``'s modules import in ``python`` (a fresh process), with versions."""
    modules = requirements_for(backend, "cpu").imports
    checks = probe_imports(python, modules)
    return {
        "ready": all(c.ok for c in checks),
        "modules": {c.module: (c.version or "ok") if c.ok else f"missing ({c.error})"
                    for c in checks},
    }


def diagnostics(env: Optional[ManagedEnv] = None, backends: Sequence[str] = BACKENDS
                ) -> dict[str, Any]:
    """Everything a bug report needs, as plain data (paths not yet redacted)."""
    env = env or ManagedEnv.default()
    python = runtime_python(env)
    return {
        "plugin_version": version(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": f"{platform.platform()} ({platform_tag()})",
        "managed_env": str(env.path),
        "managed_env_exists": env.exists,
        "runtime_python": python,
        "gpus": [f"{g.name}, {g.memory_mb} MB, driver {g.driver}" for g in nvidia_gpus()],
        "backends": {b: backend_status(b, python) for b in backends},
        "last_errors": last_errors(env),
    }


def diagnostics_text(env: Optional[ManagedEnv] = None, backends: Sequence[str] = BACKENDS) -> str:
    """The report as text, home folder redacted, ready to paste into a bug report."""
    data = diagnostics(env, backends)
    lines = [f"GeoChat for QGIS {data['plugin_version']} diagnostics"]
    for key in ("python", "executable", "platform", "managed_env", "managed_env_exists",
                "runtime_python"):
        lines.append(f"{key}: {data[key]}")
    lines.append("gpus: " + ("; ".join(data["gpus"]) or "none found (nvidia-smi)"))
    for name, status in data["backends"].items():
        modules = ", ".join(f"{m} {v}" for m, v in status["modules"].items()) or "(nothing)"
        lines.append(f"backend {name}: {'ready' if status['ready'] else 'NOT ready'}: {modules}")
    lines.append("last errors:" if data["last_errors"] else "last errors: none")
    lines += [f"  {line}" for line in data["last_errors"]]
    return redact("\n".join(lines))
