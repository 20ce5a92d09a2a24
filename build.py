#!/usr/bin/env python3
"""Build, install, run and test GeoChat for QGIS. Standard library only.

    python3 build.py setup                 QGIS, Xvfb, build tools and the two test environments
    python3 build.py package               dist/geochat_qgis-<version>.zip, checked
    python3 build.py install [--profile NAME] [--qgis-dir DIR]
    python3 build.py run                   the plugin in the QGIS desktop with the demo raster
    python3 build.py test [pytest args]    every test tier (unit, qgis, installed), offscreen
    python3 build.py test-debian13         the whole suite in a fresh Debian 13 chroot (QGIS 3.40)
    python3 build.py test-debian12         the same in a fresh Debian 12 chroot (QGIS 3.22)
    python3 build.py test-vllm [pytest args]  vLLM's CPU build in .venv-vllm, then tests/vllm

The steps live in buildtools/ beside this file (never in the plugin zip).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # loaded by path (tests, bench/qgis_startup.py): buildtools beside
    sys.path.insert(0, str(ROOT))

from buildtools import packaging  # noqa: E402
from buildtools.common import DIST, BuildError  # noqa: E402
from buildtools.debian import SUITES, test_debian  # noqa: E402
from buildtools.environments import setup  # noqa: E402
from buildtools.packaging import (DEFAULT_PROFILE, DEFAULT_QGIS_DIR, MAX_ZIP_BYTES,  # noqa: E402
                                  check_plugin_zip, install)
from buildtools.qgis_app import qgis_env, run, run_qgis, startup_script  # noqa: E402
from buildtools.tiers import test  # noqa: E402
from buildtools.vllm_tier import test_vllm  # noqa: E402

# what tests and benchmarks use of build.py (loaded as a module)
__all__ = ["DIST", "BuildError", "MAX_ZIP_BYTES", "check_plugin_zip", "install", "main", "package",
           "qgis_env", "run_qgis", "startup_script"]


def package() -> Path:
    """The checked plugin zip in :data:`DIST` (a caller may point DIST elsewhere first)."""
    return packaging.package(DIST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="install QGIS, Xvfb and the .venv (idempotent)")
    sub.add_parser("package", help="build and check dist/geochat_qgis-<version>.zip")
    for name in ("install", "run"):
        command = sub.add_parser(name, help="install the zip into a QGIS profile" if name == "install"
                                 else "start QGIS with the plugin and the demo raster")
        command.add_argument("--profile", default=DEFAULT_PROFILE)
        command.add_argument("--qgis-dir", type=Path, default=DEFAULT_QGIS_DIR,
                             help=f"QGIS settings folder holding profiles/ (default {DEFAULT_QGIS_DIR})")
    sub.add_parser("test", help="every test tier offscreen; extra args go to pytest")
    for release in SUITES:
        chroot = sub.add_parser(f"test-debian{release}", help="set-up and every test tier in a "
                                f"fresh Debian {release} chroot (root; extra args go to pytest)")
        chroot.add_argument("--fresh", action="store_true", help="debootstrap anew")
    sub.add_parser("test-vllm", help="install vLLM's CPU build into .venv-vllm (once, ~4 GB) and "
                   "run tests/vllm against it on 127.0.0.1 (extra args go to pytest)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("test", "test-debian12", "test-debian13", "test-vllm"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "setup":
            setup()
        elif args.command == "package":
            package()
        elif args.command == "install":
            install(package(), args.qgis_dir, args.profile)
        elif args.command == "run":
            setup()
            return run(package(), args.qgis_dir, args.profile)
        elif args.command == "test":
            return test(rest)
        elif args.command == "test-vllm":
            return test_vllm(rest)
        elif args.command.startswith("test-debian"):
            return test_debian(args.command[len("test-debian"):], args.fresh, rest)
    except BuildError as exc:
        print(f"[build] error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"[build] error: {' '.join(map(str, exc.cmd))} failed with exit {exc.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
