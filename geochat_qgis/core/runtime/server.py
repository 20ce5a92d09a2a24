"""The child side of the runtime: read requests from stdin, run the backend, answer on stdout.

Requests run one after another in a worker thread, so ``cancel`` and ``ping`` are answered while
a generation runs; a heartbeat thread writes ``{"type": "heartbeat"}`` every interval whatever
the worker does. End of stdin (the parent went away) shuts the child down.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import traceback
from typing import Any, Optional, TextIO

from ..backends.base import Backend, CancelToken
from ..backends.factory import BackendSpec, create_backend
from ..errors import BackendError, GeoChatError
from . import protocol

log = logging.getLogger(__name__)


class _Writer:
    """Writes protocol lines from several threads, one whole line at a time."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = protocol.dumps(message)
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the parent is gone; the stdin loop ends on its own


class RuntimeServer:
    """Holds at most one loaded backend and serves the requests of one parent."""

    def __init__(self, out: TextIO, heartbeat: float = 1.0) -> None:
        self.writer = _Writer(out)
        self.heartbeat = heartbeat
        self.backend: Optional[Backend] = None
        self.spec: Optional[BackendSpec] = None
        self.jobs: queue.Queue[Optional[dict[str, Any]]] = queue.Queue()
        self.tokens: dict[int, CancelToken] = {}
        self.stopping = threading.Event()

    def serve(self, inp: TextIO) -> int:
        self.writer.send({"type": "ready", "pid": os.getpid(), "python": sys.executable,
                          "protocol": protocol.PROTOCOL_VERSION})
        threading.Thread(target=self._beat, name="geochat-heartbeat", daemon=True).start()
        worker = threading.Thread(target=self._work, name="geochat-runtime", daemon=True)
        worker.start()
        for line in inp:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                self.writer.send({"type": "error", "id": None, "error": "BackendError",
                                  "message": f"Unreadable request line: {line[:200]!r}"})
                continue
            op = message.get("op")
            if op == "shutdown":
                break
            if op == "ping":
                self.writer.send({"type": "pong", "id": message.get("id")})
            elif op == "cancel":
                token = self.tokens.get(message.get("target"))
                if token is not None:
                    token.cancel()
            else:
                self.tokens[message.get("id")] = CancelToken()
                self.jobs.put(message)
        for token in list(self.tokens.values()):
            token.cancel()
        self.jobs.put(None)
        worker.join(timeout=30)
        self.stopping.set()
        if self.backend is not None:
            self.backend.close()
        return 0

    def _beat(self) -> None:
        while not self.stopping.wait(self.heartbeat):
            self.writer.send({"type": "heartbeat"})

    def _work(self) -> None:
        while True:
            message = self.jobs.get()
            if message is None:
                return
            request_id = message.get("id")
            token = self.tokens.get(request_id) or CancelToken()
            try:
                if message.get("op") == "load":
                    reply = self._load(message)
                elif message.get("op") == "generate":
                    reply = self._generate(message, token)
                else:
                    raise BackendError(f"Unknown runtime request '{message.get('op')}'.")
                self.writer.send({"type": "result", "id": request_id, **reply})
            except Exception as exc:  # every failure goes back to the parent as a message
                if not isinstance(exc, GeoChatError):
                    traceback.print_exc(file=sys.stderr)  # unexpected: keep it for the log
                self.writer.send({"type": "error", "id": request_id, **protocol.encode_error(exc)})
            finally:
                self.tokens.pop(request_id, None)

    def _load(self, message: dict[str, Any]) -> dict[str, Any]:
        spec = BackendSpec.from_dict(message["spec"])
        if self.backend is None or spec != self.spec:
            if self.backend is not None:
                self.backend.close()
                self.backend = self.spec = None
            backend = create_backend(spec)
            backend.load()
            self.backend, self.spec = backend, spec
        return {"describe": self.backend.describe(), "batch_size": self.backend.batch_size}

    def _generate(self, message: dict[str, Any], token: CancelToken) -> dict[str, Any]:
        if self.backend is None:
            raise BackendError("No model is loaded in the runtime: send 'load' first.")
        request_id = message.get("id")
        options = protocol.decode_options(message["options"])
        options.cancel = token
        if message["options"].get("stream"):
            options.on_token = lambda index, text: self.writer.send(
                {"type": "token", "id": request_id, "image": index, "text": text})
        images = [protocol.decode_image(item) for item in message["images"]]
        conversation = protocol.decode_conversation(message["conversation"])
        generations = self.backend.generate(images, conversation, options)
        return {"generations": [protocol.encode_generation(g) for g in generations]}


def serve(inp: TextIO, out: TextIO, heartbeat: float = 1.0) -> int:
    """Run a runtime server until stdin ends or a shutdown request comes; returns the exit code."""
    return RuntimeServer(out, heartbeat).serve(inp)
