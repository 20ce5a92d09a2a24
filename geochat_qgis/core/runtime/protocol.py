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


def dumps(message: dict[str, Any]) -> str:
    """One protocol line (no newline inside: JSON escapes them)."""
    return json.dumps(message, separators=(",", ":")) + "\n"


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
                "message": "The model ran out of memory in the runtime process. Use a smaller "
                           "or more quantised model, smaller tiles, or free some memory."}
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
