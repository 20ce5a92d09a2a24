"""``build.py setup``: QGIS, Xvfb and the C/C++ build tools from Debian's packages, then the three
Python environments (.venv for the runtime and the unit tier, .venv-qgis for QGIS's Python with
the test tools, .venv-qt6check for QGIS's Qt6 migration checker). Each step is stamped, so a
second run with nothing changed returns in seconds."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .common import QGIS_VENV, ROOT, SYSTEM_PYTHON, VENV, BuildError, say, shown

# .venv-qt6check: QGIS's migration checker (pyqt5_to_pyqt6) needs Python >= 3.12.
QT6_VENV = ROOT / ".venv-qt6check"
REQUIREMENTS = ROOT / "requirements.txt"  # what the runtime needs (core, backends, server)
TEST_REQUIREMENTS = ROOT / "requirements-test.txt"  # the test tools beside it
QGIS_REQUIREMENTS = ROOT / "requirements-qgis.txt"  # the test tools in QGIS's Python
QT6_REQUIREMENTS = ROOT / "requirements-qt6check.txt"
DEBIAN_PACKAGES = ["qgis", "python3-qgis", "qgis-providers", "python3-venv", "xvfb", "xauth"]
# llama-cpp-python ships as an sdist only: it compiles llama.cpp (C/C++ compiler, make, CMake).
BUILD_TOOLS = ["build-essential", "cmake"]
# Built from its sdist (never a build tool: `--no-binary :all:` would compile CMake too).
NO_BINARY = "llama-cpp-python"
# torch: only a CPU build. The package index's Linux torch is a CUDA build of several GB; where
# no CPU build resolves (Python 3.13 here) the torch-only tests skip, saying why.
# GEOCHAT_TORCH=any takes whatever build the index has, GEOCHAT_TORCH=none never installs it.
TORCH_ENV = "GEOCHAT_TORCH"
NO_TORCH_REASON_ENV = "GEOCHAT_NO_TORCH_REASON"  # set for the tests when torch was left out
MIN_QT6CHECK_PYTHON = (3, 12)


def qgis_importable() -> bool:
    probe = [SYSTEM_PYTHON, "-c", "import qgis.core"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def missing_debian_packages(names: list[str]) -> list[str]:
    """Those of ``names`` dpkg does not list as installed (all of them without dpkg)."""
    if not shutil.which("dpkg-query"):
        return list(names)
    result = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *names],
                            capture_output=True, text=True)
    installed = {line.split()[0] for line in result.stdout.splitlines()
                 if line.endswith("install ok installed")}
    return [name for name in names if name not in installed]


def install_debian_packages() -> None:
    """QGIS, python3-venv, Xvfb and the C/C++ build tools, each only when absent."""
    missing = missing_debian_packages(DEBIAN_PACKAGES + BUILD_TOOLS)
    if not missing and qgis_importable():
        return
    if not shutil.which("apt-get"):
        raise BuildError(
            "this is not a Debian/Ubuntu system: install QGIS (with its Python bindings), "
            f"Xvfb, a C/C++ compiler and CMake ({' '.join(missing)}) with your package "
            "manager, then run this again."
        )
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    say(f"installing Debian packages: {' '.join(missing)} (about 2 min)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-q"], check=True, env=env)
    reinstall = ["qgis"] if "qgis" not in missing and not qgis_importable() else []
    subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                           *missing, *reinstall], check=True, env=env)
    if not qgis_importable():
        raise BuildError(f"QGIS installed but `{SYSTEM_PYTHON} -c 'import qgis.core'` fails.")


def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def stamped(stamp: Path, key: str) -> bool:
    """True when ``stamp`` records ``key``: that step is done and nothing it uses changed."""
    return stamp.exists() and stamp.read_text().strip() == key


def python_version(python: Path | str) -> tuple[int, int]:
    out = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout
    major, minor = out.split()
    return int(major), int(minor)


def make_venv(venv: Path, base: str, system_site: bool) -> Path:
    """``venv`` over ``base`` (rebuilt when it was made otherwise); its python."""
    python = venv / "bin" / "python"
    config = venv / "pyvenv.cfg"
    wanted = f"include-system-site-packages = {'true' if system_site else 'false'}"
    if python.exists() and config.exists() and wanted in config.read_text():
        return python
    say(f"creating {venv.name} over {base}" + (" (sees QGIS's Python)" if system_site else ""))
    subprocess.run([base, "-m", "venv", "--clear", *(["--system-site-packages"] if system_site
                                                     else []), str(venv)], check=True)
    return python


def ensure_pip(python: Path) -> None:
    """pip >= 23.1: it reuses the wheels it built from sdists (llama-cpp-python) from its cache
    even with --no-binary; Debian 12's venv brings 23.0."""
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--upgrade", "pip>=23.1"], check=True)


def requirement_lines(path: Path) -> list[str]:
    """The requirement specifiers of a requirements file (comments and blanks dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def resolved_version(python: Path, requirement: str) -> str | None:
    """The version pip would install for ``requirement`` (metadata only, nothing downloaded
    when the index serves it); None when nothing matches."""
    with tempfile.TemporaryDirectory(prefix="geochat-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
             "--quiet", "--disable-pip-version-check", "--report", str(report), requirement],
            capture_output=True, text=True)
        if result.returncode != 0 or not report.exists():
            return None
        installs = json.loads(report.read_text()).get("install", [])
    return installs[0]["metadata"]["version"] if installs else None


def torch_decision(python: Path, requirement: str) -> str | None:
    """None to install ``requirement`` (torch); else the reason it is left out."""
    choice = os.environ.get(TORCH_ENV, "cpu").strip().lower()
    if choice == "none":
        return f"torch left out ({TORCH_ENV}=none)"
    if choice == "any":
        return None
    version = resolved_version(python, requirement)
    if version is None:
        return f"no build of {requirement} for Python {'.'.join(map(str, python_version(python)))}"
    if "+cpu" not in version:
        return (f"only a CUDA build of {requirement} ({version}, several GB) exists for Python "
                f"{'.'.join(map(str, python_version(python)))} here, no CPU build; "
                f"`{TORCH_ENV}=any python3 build.py setup` installs it")
    return None


def torch_reason_path() -> Path:
    return VENV / ".geochat-no-torch"


def ensure_runtime_venv() -> None:
    """.venv: requirements.txt + requirements-test.txt in one pip command (one resolution)."""
    python = make_venv(VENV, SYSTEM_PYTHON, system_site=False)
    runtime = requirement_lines(REQUIREMENTS)
    torch = [line for line in runtime if re.match(r"^torch\b", line)]
    key = digest(runtime, requirement_lines(TEST_REQUIREMENTS), python_version(python),
                 os.environ.get(TORCH_ENV, "cpu"))
    stamp = VENV / ".geochat-requirements.sha256"
    if stamped(stamp, key):
        return
    ensure_pip(python)
    reason = torch_decision(python, torch[0]) if torch else None
    wanted = [line for line in runtime if line not in torch] if reason else runtime
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="geochat-req-", delete=False) as handle:
        handle.write("\n".join(wanted) + "\n")
    env = dict(os.environ)
    env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=OFF")  # a portable llama.cpp pip's cache can reuse
    say("installing the runtime and test packages into .venv (llama-cpp-python compiles once, "
        "~6 min on 2 cores; pip caches the wheel)")
    try:
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                        "--no-binary", NO_BINARY, "-r", handle.name, "-r", str(TEST_REQUIREMENTS)],
                       check=True, env=env)
    finally:
        os.unlink(handle.name)
    if reason:
        say(f"torch not installed: {reason}")
        torch_reason_path().write_text(reason + "\n")
    else:
        torch_reason_path().unlink(missing_ok=True)
    check_proj(python)
    stamp.write_text(key + "\n")


def check_proj(python: Path) -> None:
    """pyproj finds its PROJ data with no warning (the wheel's own, nothing of Debian's)."""
    probe = "import pyproj; pyproj.CRS('EPSG:3857').to_wkt(); print(pyproj.datadir.get_data_dir())"
    env = {k: v for k, v in os.environ.items() if k not in ("PROJ_DATA", "PROJ_LIB")}
    result = subprocess.run([str(python), "-W", "error", "-c", probe], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0 or result.stderr.strip():
        raise BuildError(f"pyproj in {shown(python)} does not find its PROJ data cleanly: "
                         f"{(result.stderr or result.stdout).strip()[-600:]}")


def ensure_qgis_venv() -> None:
    """.venv-qgis: QGIS's Python with the test tools only."""
    python = make_venv(QGIS_VENV, SYSTEM_PYTHON, system_site=True)
    key = digest(requirement_lines(QGIS_REQUIREMENTS), python_version(python))
    stamp = QGIS_VENV / ".geochat-requirements.sha256"
    if stamped(stamp, key):
        return
    say("installing the test tools into .venv-qgis")
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    "-r", str(QGIS_REQUIREMENTS)], check=True)
    stamp.write_text(key + "\n")


def qt6check_base_python() -> str | None:
    """A Python >= 3.12 for QGIS's migration checker: the system's, then pyenv's, then uv's."""
    candidates = [SYSTEM_PYTHON, "python3.14", "python3.13", "python3.12"]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted((str(p / "bin" / "python3") for p in pyenv.glob("3.1[2-9]*")), reverse=True)
    for candidate in candidates:
        exe = shutil.which(candidate)
        if exe:
            try:
                if python_version(exe) >= MIN_QT6CHECK_PYTHON:
                    return exe
            except (OSError, subprocess.CalledProcessError, ValueError):
                continue
    uv = shutil.which("uv")
    if uv:
        found = subprocess.run([uv, "python", "find", ">=3.12"], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    return None


def ensure_qt6check_venv() -> None:
    """.venv-qt6check: qgis-pyqt5to6 with PyQt6 beside it; skipped (saying so) without a
    Python >= 3.12 (the test then skips with that reason)."""
    base = qt6check_base_python()
    if base is None:
        say("no Python >= 3.12 found (system, pyenv, uv): the Qt6 migration check will skip")
        return
    python = QT6_VENV / "bin" / "python"
    key = digest(requirement_lines(QT6_REQUIREMENTS), base, python_version(base))
    stamp = QT6_VENV / ".geochat-requirements.sha256"
    if python.exists() and stamped(stamp, key):
        return
    shutil.rmtree(QT6_VENV, ignore_errors=True)
    make_venv(QT6_VENV, base, system_site=False)
    say(f"installing QGIS's Qt6 migration checker into {QT6_VENV.name}")
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    "-r", str(QT6_REQUIREMENTS)], check=True)
    stamp.write_text(key + "\n")


def setup() -> None:
    """Idempotent: a second run with nothing changed returns in seconds."""
    started = time.monotonic()
    steps = []
    for step in (install_debian_packages, ensure_runtime_venv, ensure_qgis_venv, ensure_qt6check_venv):
        began = time.monotonic()
        step()
        steps.append(f"{step.__name__} {time.monotonic() - began:.0f} s")
    say(f"set-up ready ({time.monotonic() - started:.1f} s: {', '.join(steps)})")
