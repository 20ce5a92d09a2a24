"""The runtime protocol: one JSON object per line over the child's stdin/stdout.

Parent -> child (each with an integer ``id``)::

    {"op": "load", "spec": BackendSpec.to_dict()}
    {"op": "generate", "images": [IMAGE...], "conversation": {...}, "options": {...}}
    {"op": "cancel", "target": ID}      {"op": "ping"}      {"op": "shutdown"}
    {"op": "plan"|"run"|"ask"|"recover"|"model_status", "request": REQUEST}   (job requests:
    {"op": "status"}  {"op": "export", ...}  {"op": "get_model", ...}     see geochat_qgis.client)

    IMAGE = {"path": "tile.png"} | {"png": BASE64} | {"raw": BASE64, "shape": [H, W, 3], "dtype": "uint8"}

Child -> parent::

    {"type": "ready", "pid": ..., "python": ..., "protocol": 1}    (once, at start)
    {"type": "heartbeat"}                                           (every interval, always)
    {"type": "token", "id": ID, "image": I, "text": "..."}          (streaming)
    {"type": "result", "id": ID, ...}                               (load: describe, batch_size;
                                                                     generate: generations)
    {"type": "event", "id": ID, "event": {"type": "progress"|"token"|"tile_failed"|...}}
    {"type": "error", "id": ID, "error": "ModelError", "message": "..."}
    {"type": "result", "id": ID, "pong": true}                      (ping)
"""
from __future__ import annotations

import base64
import io
import json
from typing import Any, Optional

import numpy as np

from .. import errors
from ..backends.base import Conversation, GenerateOptions, Generation, Turn

PROTOCOL_VERSION = 1
_REQUEST = (("request", dict),)
# the fields each request must carry, with their JSON type (checked before any work starts)
REQUIRED: dict[str, tuple[tuple[str, type], ...]] = {
    "load": (("spec", dict),),
    "generate": (("images", list), ("conversation", dict), ("options", dict)),
    "plan": _REQUEST, "run": _REQUEST, "recover": _REQUEST, "ask": _REQUEST,
    "model_status": _REQUEST, "check_model": _REQUEST,
    "export": (("source", str), ("destination", str)),
    "get_model": (("model", str),), "plan_get": (("model", str),),
    "delete_sources": (("model", str),),
}
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string"}


def dumps(message: dict[str, Any]) -> str:
    """One protocol line (no newline inside: JSON escapes them)."""
    return json.dumps(message, separators=(",", ":")) + "\n"


def is_request_id(value: Any) -> bool:
    """Whether ``value`` can be a request id: an integer, a string or null."""
    return value is None or (isinstance(value, (int, str)) and not isinstance(value, bool))


def _json_kind(value: Any) -> str:
    return "null" if value is None else {bool: "a boolean", int: "a number", float: "a number",
                                         **_JSON_NAMES}.get(type(value), type(value).__name__)


def read_request(line: str) -> tuple[dict[str, Any], Optional[str]]:
    """One request line as ``(message, None)``, or ``(what can be answered, problem)`` when it
    is not a request: not JSON, not an object, a bad id, op or cancel target, a missing field."""
    try:
        message = json.loads(line)
    except ValueError:
        return {}, f"Unreadable request line (not JSON): {line.strip()[:200]!r}."
    if not isinstance(message, dict):
        return {}, (f"Malformed request line: {_json_kind(message)} where a JSON object "
                    f"belongs ({line.strip()[:200]!r}).")
    if not is_request_id(message.get("id")):
        return {}, (f"Malformed request: its 'id' is {_json_kind(message.get('id'))}; it must "
                    "be an integer or a string.")
    op, reply = message.get("op"), {"id": message.get("id")}
    if not isinstance(op, str):
        return reply, f"Malformed request: its 'op' is {_json_kind(op)}; it must be a string."
    if op == "cancel" and not is_request_id(message.get("target")):
        return reply, (f"Malformed 'cancel' request: its 'target' is "
                       f"{_json_kind(message.get('target'))}; it must be a request id.")
    for name, kind in REQUIRED.get(op, ()):
        if not isinstance(message.get(name), kind):
            found = "missing" if name not in message else _json_kind(message[name])
            return reply, (f"Malformed '{op}' request: its '{name}' is {found}; it must be "
                           f"{_JSON_NAMES[kind]}.")
    return message, None


def encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"raw": base64.b64encode(array.tobytes()).decode("ascii"),
            "shape": list(array.shape), "dtype": str(array.dtype)}


def decode_image(item: dict[str, Any]) -> np.ndarray:
    """An image (or mask array) from its protocol form: a file path, PNG bytes or raw bytes."""
    if "raw" in item:
        data = base64.b64decode(item["raw"])
        return np.frombuffer(data, dtype=item.get("dtype", "uint8")).reshape(item["shape"]).copy()
    from PIL import Image

    source = item["path"] if "path" in item else io.BytesIO(base64.b64decode(item["png"]))
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def encode_conversation(conversation: Conversation) -> dict[str, Any]:
    return {"turns": conversation.pairs(), "family": conversation.family}


def decode_conversation(data: dict[str, Any]) -> Conversation:
    return Conversation([Turn(user, assistant) for user, assistant in data["turns"]],
                        data.get("family", "geochat"))


def encode_options(options: GenerateOptions) -> dict[str, Any]:
    return {"max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
            "stop": list(options.stop), "grammar": options.grammar, "seed": options.seed,
            "stream": options.on_token is not None}


def decode_options(data: dict[str, Any]) -> GenerateOptions:
    return GenerateOptions(max_new_tokens=data["max_new_tokens"],
                           temperature=data["temperature"], stop=tuple(data["stop"]),
                           grammar=data.get("grammar"), seed=data.get("seed", 0))


def encode_generation(generation: Generation) -> dict[str, Any]:
    return {"text": generation.text,
            "masks": None if generation.masks is None else encode_array(generation.masks),
            "prompt_tokens": generation.prompt_tokens,
            "generated_tokens": generation.generated_tokens, "seconds": generation.seconds,
            "extra": generation.extra}


def decode_generation(data: dict[str, Any]) -> Generation:
    masks = data.get("masks")
    return Generation(text=data["text"], masks=None if masks is None else decode_image(masks),
                      prompt_tokens=data["prompt_tokens"],
                      generated_tokens=data["generated_tokens"], seconds=data["seconds"],
                      extra=data.get("extra") or {})


def encode_error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, MemoryError):
        return {"error": "MemoryError",
                "message": "The runtime process ran out of memory. Use smaller tiles or a "
                           "smaller area, a smaller or more quantised model, or free some "
                           "memory."}
    return {"error": type(exc).__name__, "message": str(exc) or type(exc).__name__}


def decode_error(data: dict[str, Any]) -> errors.GeoChatError:
    """The exception a child's error message stands for (GeoChat errors keep their class)."""
    cls: Optional[type] = getattr(errors, str(data.get("error")), None)
    message = str(data.get("message", ""))
    if isinstance(cls, type) and issubclass(cls, errors.GeoChatError):
        return cls(message)
    if data.get("error") == "MemoryError":
        return errors.BackendError(message)
    return errors.BackendError(f"The model runtime failed ({data.get('error')}: {message}).")
