"""The child side of the runtime: read requests from stdin, do the work, answer on stdout.

Two worker threads: heavy requests (load, generate, run, ask, get_model) run one after another
on one, light ones (plan, status, export, model_status, recover) on the other, so a preview or an
export is answered while a run goes on; ``cancel`` and ``ping`` are answered at once. The last
model stays loaded between requests. A heartbeat thread writes ``{"type": "heartbeat"}`` every
interval whatever the workers do. End of stdin (the parent went away) shuts the child down.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import traceback
from typing import Any, Callable, Optional, TextIO

from ..backends.base import Backend, CancelToken
from ..backends.factory import BackendSpec, create_backend
from ..errors import BackendError, GeoChatError
from . import info_ops, job_ops, model_ops, protocol

log = logging.getLogger(__name__)
HEAVY = frozenset({"load", "generate", "run", "ask", "get_model"})


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


class RequestContext:
    """What an operation gets: its events channel, its cancel token, the loaded model."""

    def __init__(self, server: "RuntimeServer", request_id: Any, cancel: CancelToken) -> None:
        self.server, self.request_id, self.cancel = server, request_id, cancel

    def event(self, payload: dict[str, Any]) -> None:
        self.server.writer.send({"type": "event", "id": self.request_id, "event": payload})

    def backend(self, spec: BackendSpec) -> Backend:
        return self.server.backend_for(spec, self)


class RuntimeServer:
    """Holds at most one loaded backend and serves the requests of one parent."""

    def __init__(self, out: TextIO, heartbeat: float = 1.0) -> None:
        self.writer = _Writer(out)
        self.heartbeat = heartbeat
        self.backend: Optional[Backend] = None
        self.spec: Optional[BackendSpec] = None
        self.heavy: queue.Queue[Optional[dict[str, Any]]] = queue.Queue()
        self.light: queue.Queue[Optional[dict[str, Any]]] = queue.Queue()
        self.tokens: dict[Any, CancelToken] = {}
        self.stopping = threading.Event()

    def serve(self, inp: TextIO) -> int:
        self.writer.send({"type": "ready", "pid": os.getpid(), "python": sys.executable,
                          "protocol": protocol.PROTOCOL_VERSION})
        threading.Thread(target=self._beat, name="geochat-heartbeat", daemon=True).start()
        workers = [threading.Thread(target=self._work, args=(q,), name=name, daemon=True)
                   for q, name in ((self.heavy, "geochat-heavy"), (self.light, "geochat-light"))]
        for worker in workers:
            worker.start()
        for line in inp:
            if not line.strip():
                continue
            message, problem = protocol.read_request(line)
            if problem is not None:  # answered, and the child goes on serving
                self.writer.send({"type": "error", "id": message.get("id"),
                                  "error": "BackendError", "message": problem})
                continue
            op = message.get("op")
            if op == "shutdown":
                break
            if op == "ping":
                self.writer.send({"type": "result", "id": message.get("id"), "pong": True})
            elif op == "cancel":
                token = self.tokens.get(message.get("target"))
                if token is not None:
                    token.cancel()
            else:
                self.tokens[message.get("id")] = CancelToken()
                (self.heavy if op in HEAVY else self.light).put(message)
        for token in list(self.tokens.values()):
            token.cancel()
        for jobs in (self.heavy, self.light):
            jobs.put(None)
        for worker in workers:
            worker.join(timeout=30)
        self.stopping.set()
        if self.backend is not None:
            self.backend.close()
        return 0

    def _beat(self) -> None:
        while not self.stopping.wait(self.heartbeat):
            self.writer.send({"type": "heartbeat"})

    def _work(self, jobs: queue.Queue) -> None:
        while True:
            message = jobs.get()
            if message is None:
                return
            request_id = message.get("id")
            ctx = RequestContext(self, request_id, self.tokens.get(request_id) or CancelToken())
            try:
                handler = self._handlers().get(message.get("op"))
                if handler is None:
                    raise BackendError(f"Unknown runtime request '{message.get('op')}'.")
                reply = handler(message, ctx)
                self.writer.send({"type": "result", "id": request_id, **reply})
            except Exception as exc:  # every failure goes back to the parent as a message
                if not isinstance(exc, GeoChatError):
                    traceback.print_exc(file=sys.stderr)  # unexpected: keep it for the log
                self.writer.send({"type": "error", "id": request_id, **protocol.encode_error(exc)})
            finally:
                self.tokens.pop(request_id, None)

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], RequestContext], dict[str, Any]]]:
        return {
            "load": lambda m, ctx: self._load(m),
            "generate": self._generate,
            "plan": lambda m, ctx: job_ops.plan(m["request"], ctx),
            "run": lambda m, ctx: job_ops.run(m["request"], ctx),
            "recover": lambda m, ctx: job_ops.recover(m["request"], ctx),
            "ask": lambda m, ctx: job_ops.ask(m["request"], ctx),
            "status": lambda m, ctx: info_ops.status(
                self.backend.describe() if self.backend else None, bool(m.get("deep"))),
            "model_status": lambda m, ctx: info_ops.model_status(m["request"], self.spec),
            "export": lambda m, ctx: info_ops.export(m),
            "get_model": info_ops.get_model,
            "model_list": model_ops.model_list,
            "plan_get": model_ops.plan_get,
            "delete_sources": model_ops.delete_sources,
            "check_model": model_ops.check_model,
        }

    def backend_for(self, spec: BackendSpec, ctx: Optional[RequestContext] = None) -> Backend:
        """The loaded backend for ``spec``: the cached one, or a new one (the old one freed)."""
        if self.backend is None or spec != self.spec:
            if self.backend is not None:
                self.backend.close()
                self.backend = self.spec = None
            if ctx is not None:
                ctx.event({"type": "status", "message": f"loading {spec.model}"})
            backend = create_backend(spec)
            backend.load()
            self.backend, self.spec = backend, spec
        return self.backend

    def _load(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            spec = BackendSpec.from_dict(message["spec"])
        except TypeError as exc:
            raise BackendError(f"Malformed 'load' request: its 'spec' does not fit ({exc}).") \
                from None
        backend = self.backend_for(spec)
        return {"describe": backend.describe(), "batch_size": backend.batch_size}

    def _generate(self, message: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        if self.backend is None:
            raise BackendError("No model is loaded in the runtime: send 'load' first.")
        request_id = message.get("id")
        try:
            options = protocol.decode_options(message["options"])
            images = [protocol.decode_image(item) for item in message["images"]]
            conversation = protocol.decode_conversation(message["conversation"])
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
            raise BackendError(f"The 'generate' request cannot be read ({type(exc).__name__}: "
                               f"{str(exc)[:200]}).") from None
        options.cancel = ctx.cancel
        if message["options"].get("stream"):
            options.on_token = lambda index, text: self.writer.send(
                {"type": "token", "id": request_id, "image": index, "text": text})
        generations = self.backend.generate(images, conversation, options)
        return {"generations": [protocol.encode_generation(g) for g in generations]}


def serve(inp: TextIO, out: TextIO, heartbeat: float = 1.0) -> int:
    """Run a runtime server until stdin ends or a shutdown request comes; returns the exit code."""
    return RuntimeServer(out, heartbeat).serve(inp)
