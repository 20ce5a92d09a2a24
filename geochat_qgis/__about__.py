"""Plugin metadata read from metadata.txt, its single source."""
from __future__ import annotations

import configparser
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


# Installed plugin: files sit inside the package. Source checkout: one level up.
METADATA_PATH = _first_existing(PACKAGE_DIR / "metadata.txt", PACKAGE_DIR.parent / "metadata.txt")
RESOURCES_DIR = _first_existing(PACKAGE_DIR / "resources", PACKAGE_DIR.parent / "resources")
MODELS_DIR = _first_existing(PACKAGE_DIR / "models", PACKAGE_DIR.parent / "models")


@lru_cache(maxsize=1)
def metadata() -> dict[str, str]:
    """The ``[general]`` section of metadata.txt."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(METADATA_PATH, encoding="utf-8")
    return dict(parser["general"]) if parser.has_section("general") else {}


def version() -> str:
    """The plugin version (metadata.txt)."""
    return metadata().get("version", "0.0.0")


def resource(*parts: str) -> Path:
    """Path of a file under resources/."""
    return RESOURCES_DIR.joinpath(*parts)
