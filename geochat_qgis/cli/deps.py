"""``deps status|install BACKEND|diagnostics``: the backends' Python packages."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.deps.diagnostics import diagnostics, diagnostics_text, redact
from ..core.deps.environment import ManagedEnv
from ..core.deps.pip import install_backend
from ..core.deps.requirements import requirements_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", help="managed environment folder (default under "
                        "$GEOCHAT_DEPS_DIR or ~/.local/share/geochat-qgis)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = sub.add_parser("status", help="which backends import, with versions")
    status.add_argument("--json", action="store_true")
    install = sub.add_parser("install", help="install a backend's packages")
    install.add_argument("backend", help="llama.cpp, transformers or geopixel")
    accel = install.add_mutually_exclusive_group()
    accel.add_argument("--cpu", dest="accelerator", action="store_const", const="cpu")
    accel.add_argument("--cuda", dest="accelerator", action="store_const", const="cuda")
    install.add_argument("--dry-run", action="store_true", help="only say what would be done")
    sub.add_parser("diagnostics", help="the report for bug reports (home folder redacted)")


def run(args: argparse.Namespace) -> int:
    env = ManagedEnv(Path(args.env)) if args.env else ManagedEnv.default()
    if args.action == "diagnostics":
        print(diagnostics_text(env))
        return 0
    if args.action == "status":
        data = diagnostics(env)
        if args.json:
            print(redact(json.dumps(data, indent=2)))
            return 0
        print(redact(f"runtime Python: {data['runtime_python']}"))
        print(redact(f"managed environment: {data['managed_env']} "
                     f"({'present' if data['managed_env_exists'] else 'not created'})"))
        print("GPU: " + ("; ".join(data["gpus"]) or "none found"))
        for name, status in data["backends"].items():
            modules = ", ".join(f"{m} {v}" for m, v in status["modules"].items()) or "-"
            print(f"{name:13} {'ready' if status['ready'] else 'missing':8} {modules}")
        return 0
    requirements = requirements_for(args.backend, args.accelerator)
    print(redact(f"Installing into {env.path}: {requirements.describe()}"))
    for step in requirements.steps:
        print("  pip " + " ".join(step.pip_args()))
    if args.dry_run:
        return 0
    checks = install_backend(env, requirements, on_line=print)
    for check in checks:
        print(redact(f"ok  {check.module} {check.version} ({check.file})"))
    print(f"{args.backend}: ready")
    return 0
