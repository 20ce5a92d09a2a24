"""Plugin settings: a dataclass stored in QgsSettings under ``geochat/``.

The API key is never stored here: it lives in the QGIS authentication manager and only its
configuration id (``auth_config_id``) is kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from qgis.core import QgsSettings

PREFIX = "geochat"


@dataclass
class PluginSettings:
    backend: str = "llama.cpp"  # llama.cpp | transformers | openai
    model: str = ""  # catalog name or path
    mmproj: str = ""
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0 = let the backend choose
    gpu_layers: int = -1  # -1 = all when a GPU is present
    tile_size: int = 0  # 0 = the model family's own (GeoChat 504 px, GeoPixel 1680 px)
    overlap: float = 0.1
    gsd: float = 0.0  # 0 = native
    iou_threshold: float = 0.5
    angle_convention: str = "none"  # none | ccw | cw (GeoChat's theta is unverified)
    server_url: str = "http://127.0.0.1:8000/v1"
    server_model: str = ""
    auth_config_id: str = ""  # QGIS auth manager entry holding the API key
    cache_dir: str = ""  # model downloads; empty = default cache
    max_new_tokens: int = 256
    ask_above_seconds: float = 120.0  # runs estimated longer than this ask first
    grammar: bool = True  # llama.cpp: constrain find-objects answers to boxes (always parse)

    @classmethod
    def load(cls, settings: QgsSettings | None = None) -> "PluginSettings":
        """Read every field, falling back to its default (typed like the default)."""
        settings = settings or QgsSettings()
        values = {}
        for field in fields(cls):
            default = field.default
            raw = settings.value(f"{PREFIX}/{field.name}", default)
            try:
                values[field.name] = type(default)(raw) if raw is not None else default
            except (TypeError, ValueError):
                values[field.name] = default
        return cls(**values)

    def save(self, settings: QgsSettings | None = None) -> None:
        settings = settings or QgsSettings()
        for name, value in asdict(self).items():
            settings.setValue(f"{PREFIX}/{name}", value)


SPEED_PREFIX = f"{PREFIX}/seconds_per_tile"
DEFAULT_SECONDS_PER_TILE = 20.0  # a 7B model on a laptop CPU, before anything is measured


def _speed_key(model: str) -> str:
    return f"{SPEED_PREFIX}/{model.replace('/', '_').replace(chr(92), '_') or 'default'}"


def load_speed(model: str, default: float = DEFAULT_SECONDS_PER_TILE) -> float:
    """Seconds per tile and prompt last measured for ``model`` (drives the time estimate)."""
    try:
        return float(QgsSettings().value(_speed_key(model), default))
    except (TypeError, ValueError):
        return default


def save_speed(model: str, seconds: float) -> None:
    QgsSettings().setValue(_speed_key(model), float(seconds))
