#!/usr/bin/env python3
"""Build, install, run and test GeoChat for QGIS. Standard library only.

    python3 build.py setup                 QGIS, Xvfb, build tools and the two test environments
    python3 build.py package               dist/geochat_qgis-<version>.zip, checked
    python3 build.py install [--profile NAME] [--qgis-dir DIR]
    python3 build.py run                   the plugin in the QGIS desktop with the demo raster
    python3 build.py test [pytest args]    every test tier (unit, qgis, installed), offscreen
    python3 build.py test-debian13         the whole suite in a fresh Debian 13 chroot (QGIS 3.40)
    python3 build.py test-debian12         the same in a fresh Debian 12 chroot (QGIS 3.22)
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "geochat_qgis"
SYSTEM_PYTHON = "/usr/bin/python3"  # QGIS binds to Debian's Python, not the first on PATH
# .venv: the runtime's own environment (no system site packages), as the plugin's managed
# runtime is: the core, the backends, the test tools. The unit tier runs here.
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
# .venv-qgis: QGIS's Python (system site packages) plus the test tools only, nothing of the
# core: what QGIS's process looks like for a user. The qgis and installed tiers run here.
QGIS_VENV = ROOT / ".venv-qgis"
QGIS_VENV_PYTHON = QGIS_VENV / "bin" / "python"
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
DIST = ROOT / "dist"
OUT = ROOT / "out"
DEMO_RASTER = ROOT / "resources" / "demo" / "cogeo.tif"
DEFAULT_QGIS_DIR = Path.home() / ".local" / "share" / "QGIS" / "QGIS3"
DEFAULT_PROFILE = "geochat"

# plugins.qgis.org upload rules
REQUIRED_METADATA = [
    "name", "description", "version", "qgisMinimumVersion", "author", "email", "about",
    "tracker", "repository",
]
MAX_ZIP_BYTES = 25 * 1024 * 1024
FOLDER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9\-_]+$")
FORBIDDEN_PARTS = ("__pycache__", ".git", "__MACOSX")
FORBIDDEN_SUFFIXES = (".pyc", ".pyo")
# what goes into the zip besides the package itself: (source, name inside the plugin folder)
EXTRA_FILES = [("metadata.txt", "metadata.txt"), ("LICENSE", "LICENSE")]
EXTRA_DIRS = [("resources", "resources"), ("models", "models")]


def say(message: str) -> None:
    print(f"[build] {message}", flush=True)


def shown(path: Path) -> str:
    """A path relative to the checkout when inside it (no machine paths in the output)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


class BuildError(Exception):
    """A step failed; the message says which and what to do."""


# ---------------------------------------------------------------- setup: system packages
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


# ---------------------------------------------------------------- setup: Python environments
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


# ---------------------------------------------------------------- package
def parse_metadata(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keep qgisMinimumVersion's case
    parser.read_string(text)
    return dict(parser["general"]) if parser.has_section("general") else {}


def plugin_version() -> str:
    version = parse_metadata((ROOT / "metadata.txt").read_text(encoding="utf-8")).get("version")
    if not version:
        raise BuildError("metadata.txt has no version in [general]")
    return version


def _wanted(path: Path) -> bool:
    return not any(part in FORBIDDEN_PARTS or part.startswith(".") for part in path.parts) and (
        path.suffix not in FORBIDDEN_SUFFIXES
    )


def zip_members() -> list[tuple[Path, str]]:
    """(file on disk, name in the zip) for everything the plugin ships."""
    members: list[tuple[Path, str]] = []
    for path in sorted((ROOT / PACKAGE).rglob("*")):
        relative = path.relative_to(ROOT)
        if path.is_file() and _wanted(relative):
            members.append((path, relative.as_posix()))
    for source, name in EXTRA_FILES:
        members.append((ROOT / source, f"{PACKAGE}/{name}"))
    for source, name in EXTRA_DIRS:
        for path in sorted((ROOT / source).rglob("*")):
            relative = path.relative_to(ROOT / source)
            if path.is_file() and _wanted(relative):
                members.append((path, f"{PACKAGE}/{name}/{relative.as_posix()}"))
    return members


def check_plugin_zip(zip_path: Path) -> list[str]:
    """The plugins.qgis.org rules this zip breaks (empty when it passes)."""
    problems: list[str] = []
    if zip_path.stat().st_size > MAX_ZIP_BYTES:
        problems.append(f"zip is {zip_path.stat().st_size} bytes: the limit is {MAX_ZIP_BYTES}")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        return [f"{zip_path.name} is not a zip file"]
    with archive:
        names = archive.namelist()
        if not names:
            return ["zip is empty"]
        tops = {name.split("/", 1)[0] for name in names}
        if len(tops) != 1:
            problems.append(f"zip must hold exactly one top folder, found {sorted(tops)}")
        top = sorted(tops)[0]
        if not FOLDER_NAME.match(top):
            problems.append(f"top folder {top!r} does not match {FOLDER_NAME.pattern}")
        for name in names:
            parts = name.split("/")
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                problems.append(f"absolute or '..' path in zip: {name}")
            if any(part in FORBIDDEN_PARTS for part in parts) or name.endswith(FORBIDDEN_SUFFIXES):
                problems.append(f"forbidden file in zip: {name}")
        for required in ("__init__.py", "metadata.txt"):
            if f"{top}/{required}" not in names:
                problems.append(f"{top}/{required} is missing")
        if not any(n in names for n in (f"{top}/LICENSE", f"{top}/LICENSE.txt", f"{top}/LICENSE.md")):
            problems.append(f"{top}/LICENSE is missing")
        if f"{top}/metadata.txt" in names:
            meta = parse_metadata(archive.read(f"{top}/metadata.txt").decode("utf-8"))
            for key in REQUIRED_METADATA:
                if not meta.get(key, "").strip():
                    problems.append(f"metadata.txt: required field {key!r} is missing or empty")
            icon = meta.get("icon", "").strip()
            if not icon:
                problems.append("metadata.txt: no icon")
            elif f"{top}/{icon}" not in names:
                problems.append(f"metadata.txt: icon {icon!r} is not in the zip")
    return problems


def package() -> Path:
    version = plugin_version()
    DIST.mkdir(exist_ok=True)
    target = DIST / f"{PACKAGE}-{version}.zip"
    with tempfile.NamedTemporaryFile(dir=DIST, suffix=".zip.part", delete=False) as handle:
        partial = Path(handle.name)
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, name in zip_members():
                archive.write(path, name)
        problems = check_plugin_zip(partial)
        if problems:
            raise BuildError("the plugin zip breaks plugins.qgis.org rules:\n  " + "\n  ".join(problems))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    say(f"wrote {shown(target)} ({target.stat().st_size / 1024:.0f} KiB), rules passed")
    return target


# ---------------------------------------------------------------- install
def profile_dir(qgis_dir: Path, profile: str) -> Path:
    return qgis_dir / "profiles" / profile


def enable_plugin(ini_path: Path, plugin: str = PACKAGE) -> None:
    """Set ``[PythonPlugins] plugin=true`` in a profile's QGIS3.ini, leaving the rest as is."""
    ini_path.parent.mkdir(parents=True, exist_ok=True)
    lines = ini_path.read_text(encoding="utf-8").splitlines() if ini_path.exists() else []
    section, entry = "[PythonPlugins]", f"{plugin}=true"
    if section not in lines:
        lines += ([""] if lines else []) + [section, entry]
    else:
        start = lines.index(section) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
        keep = [line for line in lines[start:end] if not line.startswith(f"{plugin}=")]
        lines[start:end] = [entry] + [line for line in keep if line.strip()] + [""]
    ini_path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")


def install(zip_path: Path, qgis_dir: Path = DEFAULT_QGIS_DIR, profile: str = DEFAULT_PROFILE) -> Path:
    """Unpack the zip into the profile's python/plugins and enable it, as the plugin manager does."""
    plugins = profile_dir(qgis_dir, profile) / "python" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    target = plugins / PACKAGE
    staging = Path(tempfile.mkdtemp(dir=plugins, prefix=".install-"))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / PACKAGE, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    enable_plugin(profile_dir(qgis_dir, profile) / "QGIS" / "QGIS3.ini")
    say(f"installed into {target} and enabled in profile {profile!r}")
    return target


# ---------------------------------------------------------------- run
def qgis_env(headless: bool) -> dict[str, str]:
    """The environment QGIS runs in: nothing of .venv on its path (QGIS's process holds only
    QGIS and the plugin's Qt code); the plugin's runtime child runs .venv's Python.

    QGIS's embedded Python finds its prefix from the first ``python3`` on PATH: a pyenv or other
    interpreter there makes it lose the qgis module, so Debian's /usr/bin comes first.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "QT_QPA_PLATFORM")}
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin", env.get("PATH", "")])
    env["GEOCHAT_RUNTIME_PYTHON"] = str(VENV_PYTHON)
    if headless:
        env["GEOCHAT_DEMO_HEADLESS"] = "1"
    return env


def startup_script(body: str, headless: bool, settle_ms: int = 3000, timeout_s: int = 240) -> str:
    """Python QGIS runs once started (``--code``).

    ``body`` defines ``main(iface)``, run after the window has settled; it may return a
    ``step()`` callable, polled until it returns True. Headless, QGIS then quits; an exception
    is printed (a Python error dialog would block a virtual display forever) and QGIS exits
    with status 1.
    """
    return textwrap.dedent(
        """
        import os, sys, time, traceback
        from qgis.core import QgsProject
        from qgis.PyQt.QtCore import QTimer
        from qgis.utils import iface
        """
    ) + textwrap.dedent(body) + textwrap.dedent(
        f"""

        def _geochat_fail():
            print("GEOCHAT-RUN-ERROR", traceback.format_exc(), flush=True)
            if {headless!r}:
                os._exit(1)

        def _geochat_done():
            if {headless!r}:
                # nobody is there to answer "save?" or "temporary layers will be lost"
                QgsProject.instance().clear()
                QgsProject.instance().setDirty(False)
                iface.mainWindow().close()

        def _geochat_poll(step, deadline):
            try:
                finished = step()
            except Exception:
                return _geochat_fail()
            if finished:
                return _geochat_done()
            if time.monotonic() > deadline:
                print("GEOCHAT-RUN-ERROR the run did not finish in {timeout_s} s", flush=True)
                if {headless!r}:
                    os._exit(1)
                return
            QTimer.singleShot(250, lambda: _geochat_poll(step, deadline))

        def _geochat_run():
            try:
                step = main(iface)
            except Exception:
                return _geochat_fail()
            if step is None:
                return _geochat_done()
            _geochat_poll(step, time.monotonic() + {timeout_s})

        QTimer.singleShot({settle_ms}, _geochat_run)
        """
    )


def demo_body(raster: Path, out: Path) -> str:
    """Load the raster, open the dock, find objects with the demo model, save what it shows."""
    return f"""
        def main(iface):
            from pathlib import Path
            from qgis.utils import plugins
            from {PACKAGE}.gui.demo import start_demo

            return start_demo(iface, plugins[{PACKAGE!r}], Path({str(raster)!r}), Path({str(out)!r}))
        """


def run_qgis(
    qgis_dir: Path, profile: str, script: str, headless: bool, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Start the real QGIS desktop application with a profile; QGIS runs ``script`` once started.

    Headless (no display) it runs on Xvfb, captures its output and is killed after ``timeout``.
    """
    OUT.mkdir(exist_ok=True)
    script_path = OUT / f"qgis_startup_{os.getpid()}.py"
    script_path.write_text(script, encoding="utf-8")
    command = [
        "qgis", "--nologo", "--noversioncheck",
        "--profiles-path", str(qgis_dir), "--profile", profile, "--code", str(script_path),
    ]
    if headless:
        if not shutil.which("xvfb-run"):
            raise BuildError("no display and no xvfb-run: run `python3 build.py setup` (installs xvfb)")
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"] + command
    say("starting QGIS: " + " ".join(command[command.index("qgis"):]))
    try:
        return subprocess.run(
            command, env=qgis_env(headless), timeout=timeout if headless else None,
            capture_output=headless, text=True,
        )
    except subprocess.TimeoutExpired as exc:
        output = "\n".join(str(part or "") for part in (exc.stdout, exc.stderr))
        raise BuildError(f"QGIS did not finish within {timeout:.0f} s and was stopped. "
                         f"What it printed:\n{output[-4000:]}") from exc
    finally:
        script_path.unlink(missing_ok=True)


def run(qgis_dir: Path, profile: str) -> int:
    setup()
    install(package(), qgis_dir, profile)
    headless = not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
    screenshot = OUT / "qgis_main_window.png"
    screenshot.unlink(missing_ok=True)
    result = run_qgis(qgis_dir, profile, startup_script(demo_body(DEMO_RASTER, OUT), headless), headless)
    if headless:
        output = result.stdout + result.stderr
        failed = result.returncode != 0 or not screenshot.exists() or "GEOCHAT-RUN-ERROR" in output
        for line in output.splitlines():
            if failed or line.startswith("GEOCHAT-RUN"):
                print(line)
        if failed:
            raise BuildError("the QGIS run failed: see its output above")
        say(f"no display: ran QGIS on a virtual display, loaded {DEMO_RASTER.name}, opened the "
            f"GeoChat dock, ran a detection and saved {shown(screenshot)} and the result layer")
    return result.returncode


# ---------------------------------------------------------------- test
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


# ---------------------------------------------------------------- Debian 12/13 chroot tiers
# Debian release -> suite; each chroot lives in $GEOCHAT_DEBIAN<N>_DIR (default /var/tmp/...)
SUITES = {"12": "bookworm", "13": "trixie"}


def chroot_dir(release: str) -> Path:
    return Path(os.environ.get(f"GEOCHAT_DEBIAN{release}_DIR", f"/var/tmp/geochat-debian{release}"))
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CHROOT_CA = "/etc/geochat-host-ca.crt"  # a copy apt's ca-certificates never regenerates
CHROOT_CHECKOUT = "/work/geochat"
BINDS = ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm"]


def chroot_copy_config(root: Path) -> None:
    """What a chroot needs to reach the package indexes: DNS, the host's CA bundle, pip's
    configuration."""
    for source in (Path("/etc/resolv.conf"), Path("/etc/pip.conf")):
        if source.exists():
            shutil.copy2(source, root / source.relative_to("/"), follow_symlinks=True)
    if Path("/etc/xdg/pip").is_dir():
        shutil.copytree("/etc/xdg/pip", root / "etc/xdg/pip", dirs_exist_ok=True)
    if HOST_CA.exists():
        shutil.copy2(HOST_CA, root / CHROOT_CA.lstrip("/"))
        (root / HOST_CA.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HOST_CA, root / HOST_CA.relative_to("/"))


KEPT_IN_CHROOT = (".venv", ".venv-qgis", ".venv-qt6check")  # set-up, stamped


def chroot_copy_checkout(root: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) into the chroot, in place of
    what an earlier copy left; the chroot's own .venv* stay (its set-up is stamped)."""
    target = root / CHROOT_CHECKOUT.lstrip("/")
    if target.is_dir():  # files deleted from the checkout must not linger there
        for entry in target.iterdir():
            if entry.name in KEPT_IN_CHROOT:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in (n for n in listed if n):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def mounted(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def chroot_run(root: Path, command: str, log, check: bool = True) -> int:
    """``command`` (bash) as root inside the chroot, with a clean environment."""
    env = ["env", "-i", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "DEBIAN_FRONTEND=noninteractive",
           "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           f"PIP_CERT={CHROOT_CA}", f"SSL_CERT_FILE={CHROOT_CA}", f"REQUESTS_CA_BUNDLE={CHROOT_CA}"]
    if os.environ.get("CI"):
        env.append(f"CI={os.environ['CI']}")
    process = subprocess.Popen(["chroot", str(root), *env, "bash", "-c", command],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)
        log.write(line)
    code = process.wait()
    if check and code != 0:
        raise BuildError(f"in the chroot {root} `{command}` failed with exit {code}")
    return code


def test_debian(release: str, fresh: bool, pytest_args: list[str]) -> int:
    """Make a Debian ``release`` chroot with debootstrap (13: trixie, QGIS 3.40, Python 3.13;
    12: bookworm, QGIS 3.22, Python 3.11), run set-up from nothing and then the whole test
    suite in it. Needs root. Log: out/debian<release>.log."""
    suite, name = SUITES[release], f"Debian {release}"
    if os.geteuid() != 0:
        raise BuildError(f"the {name} tier needs root (debootstrap, chroot, mount)")
    root = chroot_dir(release) / "root"
    log_path = OUT / f"debian{release}.log"
    if fresh and root.exists():
        for point in reversed(BINDS):
            subprocess.run(["umount", "-l", str(root / point.lstrip("/"))], capture_output=True)
        shutil.rmtree(root)
    OUT.mkdir(exist_ok=True)
    times: dict[str, float] = {}
    with open(log_path, "w", encoding="utf-8") as log:
        started = time.monotonic()
        if not (root / "etc" / "debian_version").exists():
            if not shutil.which("debootstrap"):
                subprocess.run(["apt-get", "install", "-y", "-q", "debootstrap"], check=True)
            say(f"debootstrap {suite} into {root} (~2 min)")
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["debootstrap", "--variant=minbase", suite, str(root), DEBIAN_MIRROR],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
        times["debootstrap"] = time.monotonic() - started
        chroot_copy_config(root)
        chroot_copy_checkout(root)
        done: list[Path] = []
        try:
            for point in BINDS:
                target = root / point.lstrip("/")
                target.mkdir(parents=True, exist_ok=True)
                if not mounted(target):
                    subprocess.run(["mount", "--bind", point, str(target)], check=True)
                    done.append(target)
            started = time.monotonic()
            chroot_run(root, "command -v python3 >/dev/null || "
                       "(apt-get update -q && apt-get install -y -q --no-install-recommends "
                       "python3 git ca-certificates)", log)
            chroot_run(root, f"cp {CHROOT_CA} /etc/ssl/certs/ca-certificates.crt && cd "
                       f"{CHROOT_CHECKOUT} && python3 build.py setup", log)
            times["setup"] = time.monotonic() - started
            started = time.monotonic()
            code = chroot_run(root, f"cd {CHROOT_CHECKOUT} && python3 build.py test "
                              + " ".join(map(shlex.quote, pytest_args)), log, check=False)
            times["test"] = time.monotonic() - started
        finally:
            for target in reversed(done):
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
        summary = ", ".join(f"{step} {seconds / 60:.1f} min" for step, seconds in times.items())
        say(f"{name} tier: exit {code}; {summary} (log: {shown(log_path)})")
        log.write(f"[build] {name} tier: exit {code}; {summary}\n")
    return code


# ---------------------------------------------------------------- main
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
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("test", "test-debian12", "test-debian13"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "setup":
            setup()
        elif args.command == "package":
            package()
        elif args.command == "install":
            install(package(), args.qgis_dir, args.profile)
        elif args.command == "run":
            return run(args.qgis_dir, args.profile)
        elif args.command == "test":
            return test(rest)
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
