"""``SubprocessBackend``: the Backend interface, with the model living in a child process.

The child builds the real backend from the same :class:`BackendSpec` through the backend
factory. When the child crashes, is killed (out of memory), or stops answering, the request
fails with a BackendError saying so, the child is reaped, and the next request starts a fresh
child and loads the model again. (The CLI's ``--runtime subprocess``; the plugin runs whole
jobs in the child through :mod:`geochat_qgis.client` instead.) The process handling is the
client's, standard library only.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ...client.errors import RuntimeClientError
from ...client.locate import PACKAGE_PARENT
from ...client.process import ChildProcess
from ..backends.base import Backend, Conversation, GenerateOptions, Generation
from ..backends.factory import BackendSpec, create_backend
from ..deps.diagnostics import record_error
from ..deps.environment import runtime_python
from ..errors import BackendError, Cancelled
from . import protocol

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
        self.process: Optional[ChildProcess] = None
        self._loaded = False
        self._describe = f"{spec.kind}:{spec.model}"
        self._lock = threading.RLock()

    @property
    def pid(self) -> Optional[int]:
        """The child's process id (None before the first request)."""
        return self.process.pid if self.process else None

    def describe(self) -> str:
        """The child backend's own description (it goes into result attributes: no pid)."""
        return self._describe

    def _ensure_process(self) -> ChildProcess:
        if self.process is None or not self.process.alive:
            if self.process is not None:
                self.process.kill()  # reap a dead one before replacing it

            settings = self.settings
            # the CLI runs in the core's own environment: its PYTHONPATH is the core's too
            paths = (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", ""))
            env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
            process = ChildProcess([settings.python or runtime_python()], env,
                                   settings.heartbeat_interval, settings.heartbeat_timeout,
                                   settings.startup_timeout)
            self._loaded = False
            try:
                process.start()
            except RuntimeClientError as exc:
                raise BackendError(f"{exc} (`python -m geochat_qgis deps install BACKEND` "
                                   "installs a backend's packages; or run in-process.)") from None
            self.process = process
        return self.process

    def _request(self, message: dict[str, Any], options: Optional[GenerateOptions] = None
                 ) -> dict[str, Any]:
        """Send one request and wait for its result, passing streamed tokens on."""
        process = self._ensure_process()
        deadline: list[float] = []

        def poll(request_id: int) -> None:
            cancel = options.cancel if options else None
            if cancel is None or not cancel.cancelled:
                return
            if not deadline:
                deadline.append(time.monotonic() + self.settings.cancel_grace)
                process.send({"op": "cancel", "target": request_id})
            elif time.monotonic() > deadline[0]:
                process.kill()
                self._loaded = False
                raise Cancelled("Cancelled by the user (the model runtime was stopped to do it); "
                                "results finished so far are kept.")

        def on_message(reply: dict[str, Any]) -> None:
            if reply.get("type") == "token" and options and options.on_token:
                options.on_token(reply["image"], reply["text"])

        try:
            return process.request(message, on_message, poll)
        except RuntimeClientError as exc:
            if not exc.crashed and exc.kind != "RuntimeMissing":
                raise protocol.decode_error({"error": exc.kind, "message": exc.message}) from None
            self._loaded = False

            record_error(f"runtime ({self.spec.kind}:{self.spec.model}): {exc}")
            raise BackendError(str(exc)) from None

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
