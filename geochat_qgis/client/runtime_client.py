"""``RuntimeClient``: the core's jobs over a pipe, for front ends that must not import the core.

Every method takes and returns plain data (JSON dicts, WKT, file paths). The child starts on the
first request and is restarted after a crash; heavy requests (run, ask, get_model) take turns,
light ones (plan, status, export, model_status, model_list, plan_get, ping) may run beside them.
"""
from __future__ import annotations

import atexit
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .errors import RuntimeClientError, RuntimeMissing
from .locate import runtime_command, runtime_state
from .process import _AFTER, ChildProcess
from .results import AskResult, PlanResult, RunResult, from_reply

Event = dict[str, Any]
EventFn = Optional[Callable[[Event], None]]


def is_cancelled(cancel: Any) -> bool:
    """``cancel`` may be None, a CancelToken (``.cancelled``), a threading.Event or a callable."""
    if cancel is None:
        return False
    if hasattr(cancel, "cancelled"):
        return bool(cancel.cancelled)
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


class RuntimeClient:
    """One runtime child for this client. ``python``: the interpreter (default: see
    :func:`~geochat_qgis.client.locate.runtime_command`); ``env``: extra child variables."""

    def __init__(self, python: Optional[str] = None, env: Optional[Mapping[str, str]] = None, *,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 60.0,
                 startup_timeout: float = 120.0, cancel_grace: float = 10.0) -> None:
        self.python = python
        self.env = dict(env or {})
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.startup_timeout = startup_timeout
        self.cancel_grace = cancel_grace
        self._child: Optional[ChildProcess] = None
        self._start_lock = threading.Lock()
        self._heavy = threading.Lock()
        self._cancel_now = threading.Event()
        self._closes = 0  # close() calls so far: a run stopped by close() is not recovered

    # ------------------------------------------------------------------ the child
    @property
    def pid(self) -> Optional[int]:
        """The running child's process id (None before the first request or after close)."""
        child = self._child
        return child.pid if child is not None and child.alive else None

    def _process(self) -> ChildProcess:
        with self._start_lock:
            if self._child is not None and self._child.alive:
                return self._child
            if self._child is not None:
                self._child.kill()  # reap the dead one before replacing it
                self._child = None
            command = runtime_command(self.python)
            state = runtime_state(self.python, env=self.env)
            if command is None or not state.ready:
                raise RuntimeMissing(state.message)
            child = ChildProcess(command, self.env, self.heartbeat_interval,
                                 self.heartbeat_timeout, self.startup_timeout)
            try:
                child.start()
            except RuntimeClientError as exc:
                if exc.kind == "RuntimeMissing":
                    raise RuntimeMissing(exc.message) from None
                raise
            self._child = child
            return child

    def _call(self, op: str, payload: dict[str, Any], on_event: EventFn = None,
              cancel: Any = None, heavy: bool = False) -> dict[str, Any]:
        child = self._process()
        asked: list[float] = []

        def poll(request_id: int) -> None:
            if not ((heavy and self._cancel_now.is_set()) or is_cancelled(cancel)):
                return
            if not asked:
                asked.append(time.monotonic() + self.cancel_grace)
                child.send({"op": "cancel", "target": request_id})
            elif time.monotonic() > asked[0] and child.alive:
                child.kill()  # it did not stop in time; the death is reported as a crash

        def relay(message: dict[str, Any]) -> None:
            if on_event is not None and message.get("type") == "event":
                on_event(message["event"])

        reply = child.request({"op": op, **payload}, relay, poll)
        return {k: v for k, v in reply.items() if k not in ("type", "id")}

    def _heavy_call(self, op: str, payload: dict[str, Any], on_event: EventFn,
                    cancel: Any) -> dict[str, Any]:
        """``op`` once the heavy request in progress (the dock's, another algorithm's) is
        done; cancelling while waiting gives up at once (Cancelled, nothing was run)."""
        if not self._heavy.acquire(blocking=False):
            if on_event is not None:
                on_event({"type": "status", "message": "Waiting for the GeoChat run in "
                                                       "progress to finish..."})
            while not self._heavy.acquire(timeout=0.1):
                if is_cancelled(cancel):
                    raise RuntimeClientError("Cancelled while waiting for another GeoChat run "
                                             "to finish: nothing was run.", "Cancelled")
        try:
            self._cancel_now.clear()
            return self._call(op, payload, on_event, cancel, heavy=True)
        finally:
            self._heavy.release()

    # ------------------------------------------------------------------ light requests
    def ping(self) -> float:
        """Seconds for a round trip to the child (starts it when needed)."""
        started = time.perf_counter()
        self._call("ping", {})
        return time.perf_counter() - started

    def plan(self, request: dict[str, Any]) -> PlanResult:
        """The tiles ``request`` would run: count, WKT footprints in ``output.crs``."""
        return from_reply(PlanResult, self._call("plan", {"request": request}))

    def status(self, deep: bool = False) -> dict[str, Any]:
        """``{"geochat", "python", "python_version", "versions", "backends" {kind: bool},
        "import_errors", "gpus", "loaded"}``. ``backends`` says whether each backend's
        modules are there; ``deep`` imports them in a fresh process (seconds: torch) and
        reports the errors."""
        return self._call("status", {"deep": deep})

    def model_status(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"ready", "message", "kind", "family", "model", "loaded", "missing"}`` for the
        request's model (its ``model`` dict)."""
        return self._call("model_status", {"request": request})

    def model_list(self, cache_dir: Optional[str] = None) -> list[dict[str, Any]]:
        """One row per model (the demo first): ``name, title, family, status (ready |
        downloaded | partial | missing | unavailable), download_bytes, memory_needed,
        needs_conversion, requires, backends_published, choices [{target, quant, bytes,
        temp_bytes, backends, not_here, installed}]``. Asks no server."""
        return self._call("model_list", {"cache_dir": cache_dir})["models"]

    def plan_get(self, model_id: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """What ``get_model(model_id, options)`` takes: ``sources, choices, download_bytes,
        disk_needed, disk_free, memory_needed, memory_available, problems, ok, message``."""
        return self._call("plan_get", {"model": model_id, "options": options or {}})

    def delete_sources(self, model_id: str, cache_dir: Optional[str] = None,
                       dry_run: bool = False) -> dict[str, Any]:
        """Delete a converted model's original downloads: ``{"folders", "bytes", "deleted"}``
        (``dry_run``: only what it would free)."""
        return self._call("delete_sources", {"model": model_id, "cache_dir": cache_dir,
                                             "dry_run": dry_run})

    def check_model(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"ready", "message"}``: a server model is asked for (GET /models); a local one
        as :meth:`model_status` says."""
        return self._call("check_model", {"request": request})

    def export(self, source: str, layer: Optional[str], destination: str,
               driver: Optional[str] = None, destination_layer: Optional[str] = None
               ) -> dict[str, Any]:
        """Copy a result layer to a Shapefile, GeoPackage or GeoJSON (atomically; into the
        GeoPackage layer ``destination_layer``, keeping the file's other layers):
        ``{"output", "features"}``."""
        return self._call("export", {"source": source, "layer": layer,
                                     "destination": destination, "driver": driver,
                                     "destination_layer": destination_layer})

    # ------------------------------------------------------------------ heavy requests
    def run(self, request: dict[str, Any], on_event: EventFn = None,
            cancel: Any = None) -> RunResult:
        """Run a tiled job and write its GeoPackage at ``request["output"]["path"]``.

        Raises RuntimeClientError when it cannot start (bad raster, model, area). Once tiles
        run it returns a RunResult, also when cancelled, stopped by errors or when the runtime
        died (``error`` says why, ``crashed`` for a death); finished tiles are in ``output``.
        """
        request = _with_output(request)
        closes = self._closes
        try:
            return from_reply(RunResult, self._heavy_call("run", {"request": request},
                                                          on_event, cancel))
        except RuntimeClientError as exc:
            if not exc.crashed or closes != self._closes:
                raise
            cancelled = self._cancel_now.is_set() or is_cancelled(cancel)
            return self._recover(request, exc, cancelled)

    def _recover(self, request: dict[str, Any], died: RuntimeClientError,
                 cancelled: bool) -> RunResult:
        """After a death mid-run (or a kill to enforce a cancel): a fresh child writes what
        the dead one had finished."""
        try:
            reply = self._call("recover", {"request": request})
        except RuntimeClientError as exc:
            raise RuntimeClientError(
                died.message.replace(_AFTER, f"Its finished tiles could not be written ({exc}); "
                                             "the next request starts a fresh runtime."),
                died.kind, died.exit_code) from None
        if not reply.get("tiles_done"):
            raise died
        if cancelled:
            reply.update(cancelled=True)
        else:
            reply.update(error=died.message, crashed=True)
        return from_reply(RunResult, reply)

    def ask(self, request: dict[str, Any], on_event: EventFn = None,
            cancel: Any = None) -> AskResult:
        """Ask ``request["question"]`` about its extent; boxes/masks go to ``output.path``."""
        return from_reply(AskResult, self._heavy_call("ask", {"request": request},
                                                      on_event, cancel))

    def get_model(self, model_id: str, options: Optional[dict[str, Any]] = None,
                  on_event: EventFn = None, cancel: Any = None) -> dict[str, Any]:
        """Download (and convert) a catalog model (options: target gguf | hf, quant, cache_dir,
        endpoint); events ``{"type": "get_model", "phase", "done", "total", "rate", "eta"}``.
        Returns ``{"model", "target", "quant", "folder", "model_path", "mmproj_path",
        "backends", "message"}``."""
        return self._heavy_call("get_model", {"model": model_id, "options": options or {}},
                                on_event, cancel)

    def cancel(self) -> None:
        """Cancel the heavy request in progress (finished tiles are kept)."""
        self._cancel_now.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child (it frees the model); the next request starts a fresh one."""
        self._closes += 1
        self._cancel_now.set()
        with self._start_lock:
            child, self._child = self._child, None
        if child is not None:
            child.stop(timeout)


def _with_output(request: dict[str, Any]) -> dict[str, Any]:
    """The request with an output path (a new temporary GeoPackage when it names none) and a
    run id (a new one when it names none): a fresh child must find the same path, and the run's
    own checkpoint (named by its id), to recover a killed run's tiles."""
    output = dict(request.get("output") or {})
    options = dict(request.get("options") or {})
    if not output.get("path"):
        folder = Path(tempfile.gettempdir()) / "geochat-results"
        folder.mkdir(exist_ok=True)
        output["path"] = str(folder / f"geochat-{uuid.uuid4().hex[:12]}.gpkg")
    if not options.get("run_id"):
        options["run_id"] = uuid.uuid4().hex[:12]
    return {**request, "output": output, "options": options}


_SHARED: Optional[RuntimeClient] = None
_SHARED_LOCK = threading.Lock()


def shared_client() -> RuntimeClient:
    """The process-wide client the dock and Processing share (one child, one loaded model)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = RuntimeClient()
        return _SHARED


def close_shared_client() -> None:
    """Stop the shared client's child (plugin unload); a later call starts a new one."""
    global _SHARED
    with _SHARED_LOCK:
        client, _SHARED = _SHARED, None
    if client is not None:
        client.close()


atexit.register(close_shared_client)
