"""``SubprocessBackend``: the Backend interface, with the model living in a child process.

The child builds the real backend from the same :class:`BackendSpec` through the backend
factory. When the child crashes, is killed (out of memory), or stops answering, the request
fails with a BackendError saying so, the child is reaped, and the next request starts a fresh
child and loads the model again.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..backends.base import Backend, Conversation, GenerateOptions, Generation
from ..backends.factory import BackendSpec, create_backend
from ..errors import BackendError, Cancelled
from . import protocol
from .process import RuntimeProcess

RUNTIMES = ("subprocess", "inprocess")


@dataclass
class RuntimeSettings:
    python: Optional[str] = None  # None: the managed environment's, else this Python
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 30.0  # silence after which the child counts as hung
    startup_timeout: float = 120.0
    cancel_grace: float = 10.0  # after a cancel, seconds the child gets before it is killed


class SubprocessBackend(Backend):
    """Runs ``spec``'s backend in a child process; same interface as the in-process backends."""

    name = "subprocess"

    def __init__(self, spec: BackendSpec, settings: Optional[RuntimeSettings] = None) -> None:
        self.spec = spec
        self.settings = settings or RuntimeSettings()
        self.process: Optional[RuntimeProcess] = None
        self._loaded = False
        self._describe = f"{spec.kind}:{spec.model}"
        self._next_id = 0
        self._lock = threading.RLock()

    @property
    def pid(self) -> Optional[int]:
        """The child's process id (None before the first request)."""
        return self.process.pid if self.process else None

    def describe(self) -> str:
        """The child backend's own description (it goes into result attributes: no pid)."""
        return self._describe

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _ensure_process(self) -> RuntimeProcess:
        if self.process is None or not self.process.alive:
            if self.process is not None:
                self.process.kill()  # reap a dead one before replacing it
            from ..deps.environment import runtime_python

            settings = self.settings
            process = RuntimeProcess(settings.python or runtime_python(),
                                     settings.heartbeat_interval, settings.heartbeat_timeout,
                                     settings.startup_timeout)
            self._loaded = False
            process.start()
            self.process = process
        return self.process

    def _request(self, message: dict[str, Any], options: Optional[GenerateOptions] = None
                 ) -> dict[str, Any]:
        """Send one request and wait for its result, passing streamed tokens on."""
        process = self._ensure_process()
        request_id = self._new_id()
        process.send({"id": request_id, **message})
        deadline: list[float] = []

        def poll() -> None:
            cancel = options.cancel if options else None
            if cancel is None or not cancel.cancelled:
                return
            if not deadline:
                deadline.append(time.monotonic() + self.settings.cancel_grace)
                process.send({"id": self._new_id(), "op": "cancel", "target": request_id})
            elif time.monotonic() > deadline[0]:
                process.kill()
                self._loaded = False
                raise Cancelled("Cancelled by the user (the model runtime was stopped to do it); "
                                "results finished so far are kept.")

        try:
            while True:
                reply = process.receive(poll)
                if reply.get("id") != request_id:
                    continue  # a late answer to an earlier, abandoned request
                if reply["type"] == "token" and options and options.on_token:
                    options.on_token(reply["image"], reply["text"])
                elif reply["type"] == "result":
                    return reply
                elif reply["type"] == "error":
                    raise protocol.decode_error(reply)
        except BackendError as exc:
            if not process.alive:
                self._loaded = False
                from ..deps.diagnostics import record_error

                record_error(f"runtime ({self.spec.kind}:{self.spec.model}): {exc}")
            raise

    def load(self) -> None:
        with self._lock:
            if self._loaded and self.process is not None and self.process.alive:
                return
            reply = self._request({"op": "load", "spec": self.spec.to_dict()})
            self._describe = reply.get("describe", self._describe)
            self.batch_size = int(reply.get("batch_size", 1))
            self._loaded = True

    def generate(self, images: Sequence[np.ndarray], conversation: Conversation,
                 options: GenerateOptions) -> list[Generation]:
        with self._lock:
            options.check_cancel()
            self.load()  # (re)starts and (re)loads after a crash
            reply = self._request({
                "op": "generate",
                "images": [protocol.encode_array(np.asarray(image)) for image in images],
                "conversation": protocol.encode_conversation(conversation),
                "options": protocol.encode_options(options),
            }, options)
            return [protocol.decode_generation(g) for g in reply["generations"]]

    def close(self) -> None:
        with self._lock:
            if self.process is not None:
                self.process.stop()
            self.process = None
            self._loaded = False


def open_backend(spec: BackendSpec, runtime: str = "inprocess",
                 settings: Optional[RuntimeSettings] = None) -> Backend:
    """An unloaded backend for ``spec``: in this process, or in a child (``subprocess``)."""
    if runtime == "subprocess":
        return SubprocessBackend(spec, settings)
    if runtime == "inprocess":
        return create_backend(spec)
    raise BackendError(f"Unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}.")
