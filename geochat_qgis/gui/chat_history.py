"""Chat history per raster layer, kept inside the QGIS project (saved with it)."""
from __future__ import annotations

import json
from typing import Any

from qgis.core import QgsProject

SCOPE = "GeoChat"


def _key(layer_id: str) -> str:
    return f"/chats/{layer_id}"


def load_history(project: QgsProject, layer_id: str) -> list[dict[str, Any]]:
    text, ok = project.readEntry(SCOPE, _key(layer_id), "")
    if not ok or not text:
        return []
    try:
        messages = json.loads(text)
    except ValueError:
        return []
    return messages if isinstance(messages, list) else []


def save_history(project: QgsProject, layer_id: str, messages: list[dict[str, Any]]) -> None:
    project.writeEntry(SCOPE, _key(layer_id), json.dumps(messages))


def model_history(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Earlier chat turns as the model saw them: (user turn text, raw answer)."""
    return [(m["user_text"], m["raw"]) for m in messages
            if m.get("role") == "assistant" and m.get("user_text") and "raw" in m]
