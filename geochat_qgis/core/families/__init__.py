"""Model families: prompt builders, preprocessing specs and output parsers per model.

``get_family("geochat" | "geopixel" | "qwen2.5-vl", **settings)`` returns one; settings are the
family's constructor options (GeoChat: ``angle_convention``).
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import GeoChatError
from .base import Family, Preprocess, Task

# family name -> (module in this package, class)
FAMILIES: dict[str, tuple[str, str]] = {
    "geochat": ("geochat", "GeoChatFamily"),
    "geopixel": ("geopixel", "GeoPixelFamily"),
    "qwen2.5-vl": ("qwen", "QwenFamily"),
}

__all__ = ["FAMILIES", "Family", "Preprocess", "Task", "get_family"]


def get_family(name: str, **settings: Any) -> Family:
    """The family called ``name`` (case-insensitive), configured with ``settings``."""
    key = (name or "").strip().lower()
    if key not in FAMILIES:
        raise GeoChatError(
            f"unknown model family {name!r}: choose one of {', '.join(FAMILIES)}"
        )
    module_name, class_name = FAMILIES[key]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(**settings)
