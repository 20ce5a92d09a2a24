"""An OpenAI-compatible chat completions server over HTTP (llama-server, llama_cpp.server, vLLM, Ollama).

Standard library only (urllib). Tiles travel as PNG data URIs, GeoChat's already padded to a
square and resized to 504 px as GeoChat does (PIL bicubic), so the server's own resize (vLLM's
may be torchvision's) changes nothing; up to ``max_in_flight`` requests run at once; 5xx answers
and refused or dropped connections are retried with exponential backoff; 401/403, 404, 5xx,
refused connections and timeouts each get a message that says what to check (http_errors.py).
Streaming (SSE) is used when tokens are wanted live or a cancel token is given, so a cancel stops
reading between tokens.

Prefix caching: every request about a tile starts with the same bytes (system message, then the
tile's PNG, then the text), so a server that caches prompt prefixes (llama-server's
``cache_prompt``, vLLM's automatic prefix caching) evaluates a tile's image once for all prompts
and chat turns. A run asks each prompt of ``max_in_flight`` tiles at once, then the next prompt
of the same tiles: llama-server keeps one cached prompt per slot and gives a request the slot
with the most similar prompt, so with at least ``max_in_flight`` slots (``--parallel``) every
later prompt of a tile hits its slot; vLLM's prefix cache is shared by all requests.
llama_cpp.server's multimodal handlers clear their context on every request.
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..errors import BackendError, Cancelled
from ..vision.preprocess import geochat_image
from .base import Backend, Conversation, GenerateOptions, Generation
from .http_errors import (API_KEY_ENV, Retryable, connection_error, cut_off, error_detail,
                          http_error, stream_stopped, timeout_error)
from .images import png_data_uri
from .messages import LLAVA_V1_FAMILIES, chat_messages

log = logging.getLogger(__name__)

__all__ = ["API_KEY_ENV", "HttpSettings", "OpenAIHttpBackend"]


@dataclass
class HttpSettings:
    """Where the server is and how patiently to talk to it."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: Optional[str] = None
    max_in_flight: int = 4
    timeout: float = 300.0  # seconds for one request (connect and each read)
    retries: int = 3  # extra tries after a 5xx or a connection failure
    backoff: float = 0.5  # seconds before the first retry, doubled each time
    # request field for GBNF (llama.cpp servers; vLLM gets it as structured_outputs.grammar)
    grammar_field: Optional[str] = "grammar"
    # more request fields: llama_cpp.server penalises repeats (1.1) unless told not to, which
    # breaks greedy decoding as the papers evaluate it; llama-server keeps a slot's evaluated
    # prompt for the next request with ``cache_prompt``; vLLM and Ollama ignore both fields
    extra_body: dict[str, Any] = field(
        default_factory=lambda: {"repeat_penalty": 1.0, "cache_prompt": True})


class OpenAIHttpBackend(Backend):
    """Chat completions against ``settings.base_url`` for the server-side model ``model``."""

    name = "openai"

    def __init__(self, model: str, family: str = "geochat",
                 settings: Optional[HttpSettings] = None) -> None:
        self.model = model
        self.family = family
        self.settings = settings or HttpSettings()
        self.batch_size = max(1, self.settings.max_in_flight)
        self._pool: Optional[ThreadPoolExecutor] = None
        # how the server failed since its last answer (a 5xx and its body first: the cause)
        self._failed: Optional[str] = None
        self._answered = False  # it answered a chat request in this session

    @property
    def url(self) -> str:
        return self.settings.base_url.rstrip("/") + "/chat/completions"

    def describe(self) -> str:
        return f"{self.name}:{self.model}@{self.settings.base_url}"

    def load(self) -> None:
        """Check that the server answers (GET /models), then open the request pool."""
        if self._pool is None:
            self._check_server()
            self._pool = ThreadPoolExecutor(self.batch_size, thread_name_prefix="geochat-http")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    def _check_server(self) -> None:
        """Fail before any tile when the server is down, refuses the key or the URL is wrong.

        A 5xx here is only logged: the model may still be loading, and requests are retried.
        """
        url = self.settings.base_url.rstrip("/") + "/models"
        request = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.settings.timeout, 30.0)) as answer:
                listing = json.loads(answer.read().decode("utf-8") or "{}")
        except urllib.error.HTTPError as exc:
            failure = self._http_error(exc, url)
            if isinstance(failure, Retryable):
                log.warning("%s", failure.error)
                return
            raise failure from None
        except (TimeoutError, socket.timeout):
            raise timeout_error(self.settings.base_url, self.settings.timeout) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            failure = self._connection_error(getattr(exc, "reason", exc))
            raise getattr(failure, "error", failure) from None
        except (ValueError, http.client.HTTPException):
            return  # not JSON or cut short: the chat request will say what is wrong
        items = listing.get("data") if isinstance(listing, dict) else listing
        names = [item.get("id") for item in (items if isinstance(items, list) else [])
                 if isinstance(item, dict)]
        if names and self.model not in names:
            log.warning("the server at %s lists the models %s, not '%s'",
                        self.settings.base_url, ", ".join(map(str, names)), self.model)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def generate(self, images: Sequence[np.ndarray], conversation: Conversation,
                 options: GenerateOptions) -> list[Generation]:
        self.load()
        options.check_cancel()
        futures = [self._pool.submit(self._with_retries, index, image, conversation, options)
                   for index, image in enumerate(images)]
        return [future.result() for future in futures]

    # -- one request ---------------------------------------------------------------------------

    def _payload(self, image: np.ndarray, conversation: Conversation,
                 options: GenerateOptions, stream: bool) -> bytes:
        if self.family in LLAVA_V1_FAMILIES:  # GeoChat's pad and PIL bicubic resize to 504 px
            image = geochat_image(image)
        body: dict[str, Any] = {
            **self.settings.extra_body,
            "model": self.model,
            "messages": chat_messages(conversation, png_data_uri(image)),
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "seed": options.seed,
            "stream": stream,
        }
        if stream:  # servers that support it end the stream with the token counts
            body["stream_options"] = {"include_usage": True}
        if options.stop:
            body["stop"] = list(options.stop)
        if options.grammar and self.settings.grammar_field:
            body[self.settings.grammar_field] = options.grammar  # llama.cpp's servers
            body["structured_outputs"] = {"grammar": options.grammar}  # vLLM's (xgrammar GBNF)
        return json.dumps(body).encode("utf-8")

    def _with_retries(self, index: int, image: np.ndarray, conversation: Conversation,
                      options: GenerateOptions) -> Generation:
        stream = options.on_token is not None or options.cancel is not None
        payload = self._payload(image, conversation, options, stream)
        delay = self.settings.backoff
        for attempt in range(self.settings.retries + 1):
            options.check_cancel()
            try:
                return self._request(index, payload, options, stream)
            except Retryable as failure:
                if attempt == self.settings.retries:
                    raise BackendError(
                        f"{failure.error} (gave up after {attempt + 1} tries)") from None
                log.warning("%s; retrying in %.1f s", failure.error, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _request(self, index: int, payload: bytes, options: GenerateOptions,
                 stream: bool) -> Generation:
        request = urllib.request.Request(self.url, data=payload, headers=self._headers(),
                                         method="POST")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                if stream:
                    text, usage, finish = self._read_stream(index, response, options)
                else:
                    text, usage, finish = _completion(json.loads(response.read().decode("utf-8")))
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, self.url) from None
        except (TimeoutError, socket.timeout):
            raise timeout_error(self.settings.base_url, self.settings.timeout) from None
        except urllib.error.URLError as exc:
            raise self._connection_error(exc.reason) from None
        except ConnectionError as exc:  # closed or reset before the answer
            raise self._connection_error(exc) from None
        except http.client.HTTPException as exc:  # IncompleteRead: a body cut short
            self._failed = self._failed or "the connection dropped mid-answer"
            raise cut_off(self.settings.base_url, exc) from None
        except ValueError as exc:
            raise BackendError(
                f"The server at {self.settings.base_url} sent an answer that is not an OpenAI "
                f"chat completion ({exc}). Check that the URL points at an OpenAI-compatible /v1."
            ) from None
        self._answered, self._failed = True, None
        return Generation(
            text=text.strip(),
            prompt_tokens=_count(usage.get("prompt_tokens")),
            generated_tokens=_count(usage.get("completion_tokens")),
            seconds=time.perf_counter() - start,
            extra={"finish_reason": finish},
        )

    def _read_stream(self, index: int, response, options: GenerateOptions
                     ) -> tuple[str, dict, Optional[str]]:
        """The streamed answer; ValueError for events of the wrong shape, BackendError for a
        stream that stops before its end (no ``[DONE]`` and no finish reason)."""
        pieces: list[str] = []
        usage: dict = {}
        finish = None
        ended = events = False
        for event in _sse_events(response):
            if options.cancel is not None and options.cancel.cancelled:
                raise Cancelled("Cancelled by the user; results finished so far are kept.")
            if event is _DONE:
                ended = True
                break
            events = True
            if not isinstance(event, dict):
                raise ValueError(f"an event is a JSON {type(event).__name__}, not an object")
            usage = _object(event.get("usage"), "usage") or usage
            for choice in _list(event.get("choices"), "choices"):
                delta = _object(_object(choice, "a choice").get("delta"), "delta")
                piece = delta.get("content")
                if piece:
                    pieces.append(str(piece))
                    if options.on_token is not None:
                        options.on_token(index, str(piece))
                finish = choice.get("finish_reason") or finish
        if not events:
            raise ValueError("the answer is not an event stream (no 'data:' line)")
        if not (ended or finish):
            self._failed = self._failed or "the connection dropped mid-answer"
            raise stream_stopped(self.settings.base_url, len(pieces))
        if not usage:
            usage = {"completion_tokens": len(pieces)}
        return "".join(pieces), usage, finish

    # -- messages (http_errors.py) -----------------------------------------------------------

    def _http_error(self, exc: urllib.error.HTTPError, url: str) -> Exception:
        try:
            detail = error_detail(exc.read())
        except OSError:
            detail = ""
        failure = http_error(exc.code, detail, self.settings.base_url, url, self.model)
        if exc.code >= 500:
            self._failed = f"HTTP {exc.code}{': ' + detail if detail else ''}"
        return failure

    def _connection_error(self, reason: object) -> Exception:
        failure = connection_error(reason, self.settings.base_url, self.settings.timeout,
                                   self._failed, self._answered)
        if isinstance(reason, ConnectionError) and not isinstance(reason, ConnectionRefusedError):
            self._failed = self._failed or "the connection dropped without an answer"
        return failure


_DONE = object()


def _sse_events(response) -> Iterator[Any]:
    """JSON values of a ``text/event-stream`` (``data: ...`` lines), then ``_DONE`` at
    ``[DONE]``; ValueError for a line that is not JSON."""
    for raw in response:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield _DONE
            return
        yield json.loads(data)


def _completion(data: Any) -> tuple[str, dict, Optional[str]]:
    """Text, usage and finish reason of a chat completion; ValueError for another shape."""
    choices = _list(_object(data, "the answer").get("choices"), "choices")
    if not choices:
        raise ValueError("the completion has no choices")
    choice = _object(choices[0], "a choice")
    content = _object(choice.get("message"), "message").get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"the message content is a {type(content).__name__}, not text")
    return content or "", _object(data.get("usage"), "usage"), choice.get("finish_reason")


def _count(value: Any) -> int:
    """A token count from a server (0 when it sends something else)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _object(value: Any, what: str) -> dict:
    """``value`` if it is a JSON object (None: an empty one); ValueError naming ``what``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def _list(value: Any, what: str) -> list:
    """``value`` if it is a JSON list (None: an empty one); ValueError naming ``what``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{what} is a JSON {type(value).__name__}, not a list")
    return value
