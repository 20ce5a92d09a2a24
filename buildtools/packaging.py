"""``build.py package`` and ``install``: the plugin zip (the package, metadata.txt, LICENSE,
resources/ and models/; nothing else of the checkout), checked against plugins.qgis.org's rules,
and its installation into a QGIS profile as the plugin manager does it."""
from __future__ import annotations

import configparser
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from .common import DIST, PACKAGE, ROOT, BuildError, say, shown

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


def package(dist: Optional[Path] = None) -> Path:
    """dist/geochat_qgis-<version>.zip (``dist``: another folder), checked; its path."""
    dist = dist or DIST
    version = plugin_version()
    dist.mkdir(exist_ok=True)
    target = dist / f"{PACKAGE}-{version}.zip"
    with tempfile.NamedTemporaryFile(dir=dist, suffix=".zip.part", delete=False) as handle:
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
