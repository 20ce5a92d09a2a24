"""The JSON files of a GeoPixel checkpoint folder (config, tokenizer settings), read as objects."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ModelError


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path`` as a dict; a ModelError naming ``what`` (e.g. "the tokenizer file x.json") and
    saying to download the model again when it cannot be read or is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot read {what} ({exc}); download the model again.") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{what} does not hold a JSON object; download the model again.")
    return data
