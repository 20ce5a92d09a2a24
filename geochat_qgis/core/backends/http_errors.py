"""What the OpenAI HTTP backend says when a server fails: which server, what it answered, what to check.

A server's error body is shown by its message (vLLM and llama-server wrap it in JSON: ``{"error":
{"message": ...}}`` or ``{"object": "error", "message": ...}``). A server that fails a GeoChat
request with a 5xx or drops the connection has usually crashed on the request itself, so the
message points at its log and the two causes seen in practice (issue 23): an image processor
that is not GeoChat's 504 px, a chat template that is not the converted folder's. A connection
refused after such a failure says both: the server stopped, and why it probably did.
"""
from __future__ import annotations

import json
import socket
from typing import Any, Optional

from ..errors import BackendError

API_KEY_ENV = "GEOCHAT_API_KEY"

LOG_HINT = (
    "Check the server's log: a GeoChat server fails like this when its image processor is not "
    "GeoChat's 504 px or its chat template is not the converted folder's (serve the folder "
    "`convert --to hf` wrote, unchanged); it may also be out of memory."
)


class Retryable(Exception):
    """A failure worth another try (5xx, connection refused or dropped)."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error))
        self.error = error


def error_detail(body: bytes, limit: int = 300) -> str:
    """The message of a server's error body: the JSON ``message`` where there is one, else the
    text itself, on one line, at most ``limit`` characters."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            kind = inner.get("type")
            text = inner["message"] + (f" ({kind})" if isinstance(kind, str) and kind else "")
        elif isinstance(inner, str):
            text = inner
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def timeout_error(where: str, timeout: float) -> BackendError:
    return BackendError(
        f"The server at {where} did not answer within {timeout:g} s. It may be overloaded or "
        "loading the model: raise the timeout or check the server."
    )


def http_error(code: int, detail: str, where: str, url: str, model: str) -> Exception:
    """The message for an HTTP error status (a Retryable one for 5xx)."""
    said = f"HTTP {code}{': ' + detail if detail else ''}"
    if code in (401, 403):
        return BackendError(
            f"The server at {where} refused the request (HTTP {code}): the API key is missing or "
            f"wrong. Set it in the environment variable {API_KEY_ENV} (command line) or in the "
            "plugin's authentication settings."
        )
    if code == 404:
        return BackendError(
            f"Not found at {url} ({said}). Check the server URL (it usually ends in /v1) and the "
            f"model name '{model}' (the server lists its models at /v1/models)."
        )
    if code >= 500:
        return Retryable(BackendError(f"The server at {where} failed ({said}). {LOG_HINT}"))
    return BackendError(
        f"The server at {where} rejected the request ({said}). Check the model name and the "
        "request options."
    )


def connection_error(reason: object, where: str, timeout: float,
                     earlier: Optional[str] = None, answered: bool = False) -> Exception:
    """The message for a connection that failed; ``earlier``: how the server last failed
    (``HTTP 500: ...``), said when it now refuses connections (it has stopped); ``answered``:
    it answered before in this session."""
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return BackendError(
            f"Connecting to {where} timed out after {timeout:g} s. Check the address and that "
            "the server is reachable."
        )
    if isinstance(reason, ConnectionRefusedError):
        if earlier:
            message = (f"Cannot connect to {where}: connection refused, after the server failed "
                       f"({earlier}): it has stopped. {LOG_HINT} Then restart it.")
        elif answered:
            message = (f"Cannot connect to {where}: connection refused. The server answered "
                       "before and has stopped: check its log (it may have run out of memory) "
                       "and restart it.")
        else:
            message = (f"Cannot connect to {where}: connection refused. Is the server running? "
                       "Start it or correct the server URL.")
    elif isinstance(reason, ConnectionError):  # reset or closed without an answer
        message = (f"The server at {where} dropped the connection without an answer "
                   f"({type(reason).__name__}: {reason}). {LOG_HINT}")
    else:
        message = f"Cannot reach {where} ({reason}). Check the server URL and the network."
    return Retryable(BackendError(message))


def cut_off(where: str, exc: Exception) -> Retryable:
    """An answer whose body was cut short (the connection closed mid-answer)."""
    return Retryable(BackendError(
        f"The answer from {where} was cut off ({type(exc).__name__}: {str(exc)[:100]}): the "
        f"server or a proxy dropped the connection mid-answer. {LOG_HINT}"
    ))


def stream_stopped(where: str, pieces: int) -> BackendError:
    """A streamed answer that ended with neither ``[DONE]`` nor a finish reason."""
    return BackendError(
        f"The answer stream from {where} stopped before its end (after {pieces} pieces): the "
        f"server or a proxy dropped the connection; the tile is counted as failed. {LOG_HINT}"
    )
