#!/usr/bin/env python3
"""Build, install, run and test GeoChat for QGIS. Standard library only.

    python3 build.py setup                 QGIS, Xvfb and the .venv with every dependency
    python3 build.py package               dist/geochat_qgis-<version>.zip, checked
    python3 build.py install [--profile NAME] [--qgis-dir DIR]
    python3 build.py run                   the plugin in the QGIS desktop with the demo raster
    python3 build.py test [pytest args]    every test tier, offscreen
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "geochat_qgis"
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
REQUIREMENTS = ROOT / "requirements.txt"
STAMP = VENV / ".requirements.sha256"
LLAMA_STAMP = VENV / ".llama_cpp.sha256"
SYSTEM_PYTHON = "/usr/bin/python3"  # QGIS binds to Debian's Python, not the first on PATH
DEBIAN_PACKAGES = ["qgis", "python3-qgis", "qgis-providers", "python3-venv", "python3-pyproj", "xvfb",
                   "xauth"]
NO_DEPS_PACKAGES = ["geopandas==1.2.0"]  # see requirements.txt: never a second PROJ in QGIS
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


# ---------------------------------------------------------------- setup
def qgis_importable() -> bool:
    probe = [SYSTEM_PYTHON, "-c", "import qgis.core"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def missing_debian_packages() -> list[str]:
    missing = []
    for name in DEBIAN_PACKAGES:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True
        )
        if "install ok installed" not in result.stdout:
            missing.append(name)
    return missing


def install_debian_packages() -> None:
    missing = missing_debian_packages() if shutil.which("dpkg-query") else DEBIAN_PACKAGES
    if not missing and qgis_importable():
        return
    if not shutil.which("apt-get"):
        raise BuildError(
            "QGIS is not installed and this is not a Debian/Ubuntu system: install QGIS "
            f"{'/'.join(missing)} with your package manager, then run this again."
        )
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    say(f"installing Debian packages: {' '.join(missing)} (about 2 min)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        + (["qgis"] if "qgis" not in missing and not qgis_importable() else []),
        check=True,
        env=env,
    )
    if not qgis_importable():
        raise BuildError(f"QGIS installed but `{SYSTEM_PYTHON} -c 'import qgis.core'` fails.")


# llama-cpp-python ships only as an sdist that compiles llama.cpp. Its LLaVA vision graph puts
# CLIP's CLS embedding after the patches while the rest of the code expects it first: every
# patch gets its neighbour's position embedding, the first patch is dropped and CLS reaches the
# language model. GeoChat (LLaVA-1.5) GGUF answers then differ from the original model. We build
# it with CLS first, as CLIP and transformers do (checked by tests/unit/test_convert_parity.py).
LLAMA_CPP = "llama-cpp-python==0.3.36"
LLAMA_CPP_PATCHES = [
    (
        "vendor/llama.cpp/tools/mtmd/models/llava.cpp",
        "inp = ggml_concat(ctx0, inp, model.class_embedding, 1);",
        "inp = ggml_concat(ctx0, model.class_embedding, inp, 1);  // CLS first (GeoChat for QGIS)",
    ),
]


def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def stamped(stamp: Path, key: str) -> bool:
    """True when ``stamp`` records ``key``: that step is done and nothing it uses changed."""
    return stamp.exists() and stamp.read_text().strip() == key


def install_patched_llama_cpp(pip: list[str], env: dict[str, str]) -> None:
    """Download the llama-cpp-python sdist, apply LLAMA_CPP_PATCHES, build and install it."""
    with tempfile.TemporaryDirectory(prefix="geochat-llama-") as tmp:
        subprocess.run([str(VENV_PYTHON), "-m", "pip", "download", "--disable-pip-version-check",
                        "--no-deps", "--no-binary", ":all:", LLAMA_CPP, "-d", tmp], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse unsafe members
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        source = next(p for p in Path(tmp).iterdir() if p.is_dir())
        for relative, old, new in LLAMA_CPP_PATCHES:
            path = source / relative
            text = path.read_text(encoding="utf-8")
            if text.count(old) != 1:
                raise BuildError(f"cannot patch {relative} of {LLAMA_CPP}: the line to fix is not "
                                 "there once; update LLAMA_CPP_PATCHES in build.py")
            path.write_text(text.replace(old, new), encoding="utf-8")
        say(f"building {LLAMA_CPP} with the LLaVA CLS-order fix (~6 min on 2 cores)")
        # its dependencies and server extras come from requirements.txt
        subprocess.run(pip + ["--force-reinstall", "--no-deps", str(source)], check=True, env=env)


def ensure_venv() -> None:
    if not VENV_PYTHON.exists():
        say(f"creating {VENV.name} over {SYSTEM_PYTHON} (sees QGIS's Python packages)")
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    env = dict(os.environ)
    # a portable llama.cpp build whose wheel pip caches for other CPUs too
    env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=OFF")
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--disable-pip-version-check"]
    requirements = digest(REQUIREMENTS.read_text(), NO_DEPS_PACKAGES)
    if not stamped(STAMP, requirements):
        say("installing Python dependencies")
        subprocess.run(pip + ["-r", str(REQUIREMENTS)], check=True, env=env)
        subprocess.run(pip + ["--no-deps", *NO_DEPS_PACKAGES], check=True, env=env)
        STAMP.write_text(requirements + "\n")
    llama = digest(LLAMA_CPP, LLAMA_CPP_PATCHES)
    if not stamped(LLAMA_STAMP, llama):
        install_patched_llama_cpp(pip, env)
        LLAMA_STAMP.write_text(llama + "\n")


def setup() -> None:
    """Idempotent: a second run with nothing changed returns in seconds."""
    started = time.monotonic()
    install_debian_packages()
    ensure_venv()
    say(f"set-up ready ({time.monotonic() - started:.1f} s)")


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
def venv_site_packages() -> Path:
    found = sorted((VENV / "lib").glob("python3*/site-packages"))
    if not found:
        raise BuildError(f"{VENV} has no site-packages: run `python3 build.py setup`")
    return found[0]


def qgis_env(headless: bool) -> dict[str, str]:
    """QGIS runs Debian's Python: put the venv's packages on its path.

    QGIS's embedded Python finds its prefix from the first ``python3`` on PATH: a pyenv or other
    interpreter there makes it lose the qgis module, so Debian's /usr/bin comes first.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin", env.get("PATH", "")])
    env.pop("QT_QPA_PLATFORM", None)  # a real window, on the real or the virtual display
    env["PYTHONPATH"] = os.pathsep.join(
        [str(venv_site_packages())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
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
TIERS = [
    ("unit", ["tests/unit", "-p", "no:pytest_qgis"]),
    ("qgis", ["tests/qgis"]),
]


def test(pytest_args: list[str]) -> int:
    setup()
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1")
    env.pop("DISPLAY", None)
    failed = []
    paths = [a for a in pytest_args if a.startswith("tests")]
    for name, (tier_dir, *tier_flags) in TIERS:
        tier_paths = [p for p in paths if p.startswith(tier_dir)]
        if paths and not tier_paths:
            continue  # the caller named tests of other tiers only
        options = [a for a in pytest_args if a not in paths]
        args = tier_flags + (tier_paths or [tier_dir]) + options
        say(f"test tier {name}: pytest {' '.join(args)}")
        code = subprocess.run([str(VENV_PYTHON), "-m", "pytest", *args], cwd=ROOT, env=env).returncode
        if code != 0:  # 5 = no tests collected: a failure too
            failed.append(f"{name} (pytest exit {code}{', no tests ran' if code == 5 else ''})")
    if failed:
        say("FAILED tiers: " + ", ".join(failed))
        return 1
    say("all test tiers passed")
    return 0


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
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "test":
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
    except BuildError as exc:
        print(f"[build] error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"[build] error: {' '.join(map(str, exc.cmd))} failed with exit {exc.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
