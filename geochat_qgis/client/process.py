"""One runtime child (``python -m geochat_qgis runtime serve``) and the JSON lines to and from it.

A reader thread sorts the child's lines by request id, so several requests may be in flight
(light ones while a run goes on). Heartbeats prove the child alive; silence past the timeout
counts as hung (the child is killed). A dead child is always reaped (no zombie) and described in
words: killed (SIGKILL: what the out-of-memory killer sends), crashed in native code, exited.
The child exits by itself when its stdin closes (this process went away): no orphan.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import json
import queue
import signal
import subprocess
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import RuntimeClientError
from .locate import child_env, popen_options

Message = dict[str, Any]
_EOF = object()
_LIVE: "weakref.WeakSet[ChildProcess]" = weakref.WeakSet()
_NATIVE_CRASHES = {"SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"}
_AFTER = "Results finished so far are kept; the next request starts a fresh runtime."
_KINDS = frozenset({"ready", "heartbeat", "token", "result", "event", "error"})
_PROTOCOL = "RuntimeProtocol"
_HEAVY = frozenset({"load", "generate", "run", "ask", "get_model"})


def describe_exit(code: Optional[int]) -> str:
    """Words for a child's exit status."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGKILL":
            return ("was killed (SIGKILL), likely out of memory: the system's out-of-memory "
                    "killer does this when RAM runs out, and the model may need more than is free")
        if name in _NATIVE_CRASHES:
            return f"crashed ({name}) in native code (llama.cpp, torch or a GPU driver)"
        return f"was stopped by {name}"
    if code in (0xC0000005, 0xC00000FD, 0xC0000409):  # Windows: access violation, stack
        return f"crashed (Windows status {code:#x}) in native code"
    return f"exited with code {code}" if code else "exited"


def line_problem(message: Any) -> Optional[str]:
    """What makes a decoded line from the child no protocol message (None: it is one)."""
    if not isinstance(message, dict):
        return "not a JSON object"
    kind = message.get("type")
    if kind not in _KINDS:
        return f"unknown message type {kind!r}"
    if kind not in ("ready", "heartbeat") and not (
            message.get("id") is None or type(message.get("id")) is int):
        return f"a request id that is no integer ({message.get('id')!r})"
    if kind == "event" and not isinstance(message.get("event"), dict):
        return "an event that is no JSON object"
    return None


def model_named(message: Message) -> Optional[str]:
    """The model file, folder or name a request names (None: it names none)."""
    request = message.get("request")
    model = message.get("spec") or (request.get("model") if isinstance(request, dict) else None)
    if not isinstance(model, dict):
        return None
    name = model.get("model") or model.get("model_path") or model.get("name")
    return str(name) if name else None


def dumps(message: Message) -> str:
    """One protocol line (JSON escapes newlines, so a message is always one line)."""
    return json.dumps(message, separators=(",", ":")) + "\n"


class ChildProcess:
    """The parent's handle on one child: start, exchange requests, kill, stop."""

    def __init__(self, command: Sequence[str], env: Optional[Mapping[str, str]] = None,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 60.0,
                 startup_timeout: float = 120.0) -> None:
        self.command = [*command, "-m", "geochat_qgis", "runtime", "serve",
                        "--heartbeat", str(heartbeat_interval)]
        self.env = child_env(env)
        self.heartbeat_timeout = heartbeat_timeout
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.info: Message = {}
        self.returncode: Optional[int] = None
        self._pending: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._dead = False
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._threads: list[threading.Thread] = []
        self.last_seen = 0.0
        self.model: Optional[str] = None  # the model the child was last asked to use
        self.activity: Optional[str] = None  # what the child was last doing (heavy work)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self._dead and self.proc.poll() is None

    def start(self) -> None:
        """Start the child and wait for its ``ready`` line; RuntimeClientError if it fails."""
        try:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                bufsize=1, env=self.env, **popen_options())
        except OSError as exc:
            raise RuntimeClientError(
                f"Could not start the GeoChat runtime with {self.command[0]} ({exc}). Install "
                "the runtime (Raster > GeoChat > Install model dependencies...) or set "
                "GEOCHAT_RUNTIME_PYTHON to a Python that has GeoChat's core packages.",
                "RuntimeMissing") from exc
        _LIVE.add(self)
        self.last_seen = time.monotonic()
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True,
                                          name="geochat-client-out"),
                         threading.Thread(target=self._read_stderr, daemon=True,
                                          name="geochat-client-err")]
        for thread in self._threads:
            thread.start()
        if not self._ready.wait(self.startup_timeout):
            self.kill()
            raise RuntimeClientError(f"The GeoChat runtime did not start within "
                                     f"{self.startup_timeout:g} s and was stopped.", "RuntimeHung")
        if self._dead or self.info.get("type") != "ready":
            raise self.death()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                try:
                    self._dispatch(line)
                except Exception as exc:  # noqa: BLE001 - this thread must outlive any line
                    self._unreadable(line, f"{type(exc).__name__}: {exc}", None)
        except (OSError, ValueError):
            pass  # pipe closed under us
        self.returncode = self.proc.wait()  # reap now: no zombie even with no request waiting
        with self._lock:
            self._dead = True
            waiting = list(self._pending.values())
        for box in waiting:
            box.put(_EOF)
        self._ready.set()

    def _dispatch(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            if not self._ready.is_set():  # printed before the protocol started: keep it
                self._stderr.append(line.rstrip())
            else:
                self._unreadable(line, "not JSON", None)
            return
        self.last_seen = time.monotonic()
        problem = line_problem(message)
        if problem is not None:
            self._unreadable(line, problem, message)
            return
        kind = message.get("type")
        if kind == "heartbeat":
            return
        if kind == "ready":
            self.info = message
            self._ready.set()
            return
        if kind == "event":
            self._follow(message["event"])
        with self._lock:
            box = self._pending.get(message.get("id"))
        if box is not None:
            box.put(message)  # a late answer to an abandoned request is dropped

    def _note(self, message: Message) -> None:
        """Remember the model and the heavy work a request starts (for a death's message)."""
        op = message.get("op")
        if op not in _HEAVY:
            return
        self.model = model_named(message) or self.model
        model = self.model or "the loaded model"
        self.activity = {"load": f"loading {model}", "generate": f"generating with {model}",
                         "get_model": f"getting the model {message.get('model')}"}.get(
            str(op), f"running '{op}' with {model}")

    def _follow(self, event: Message) -> None:
        """A child's event that says what it is doing now."""
        if event.get("type") == "status" and str(event.get("message", "")).startswith("loading "):
            self.activity = str(event["message"])
        elif event.get("type") == "progress" and event.get("total"):
            self.activity = (f"running {self.model or 'the model'} on tiles after "
                             f"{event.get('done')} of {event.get('total')} were done")

    def _unreadable(self, line: str, problem: str, message: Any) -> None:
        """A line from the child that is no protocol message: its request (all waiting
        requests when it names none) fails at once with what the line was."""
        self._stderr.append(line.rstrip())
        failure = {"type": "error", "error": _PROTOCOL, "message": (
            f"The GeoChat runtime sent a line the plugin cannot read ({problem}: "
            f"{line.strip()[:200]!r}), so this request was stopped. QGIS and the runtime go "
            "on; if this repeats, reinstall the runtime (Raster > GeoChat > Install model "
            "dependencies...) and report it with that line.")}
        request_id = message.get("id") if isinstance(message, dict) else None
        with self._lock:
            boxes = ([self._pending[request_id]] if type(request_id) is int
                     and request_id in self._pending else list(self._pending.values()))
        for box in boxes:
            box.put(failure)

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                self._stderr.append(line.rstrip())
        except (OSError, ValueError):
            pass

    def stderr_tail(self, lines: int = 8) -> str:
        return " | ".join(list(self._stderr)[-lines:])

    def send(self, message: Message) -> None:
        """Write one message; RuntimeClientError when the child is gone."""
        if not self.alive:
            raise self.death()
        try:
            assert self.proc is not None and self.proc.stdin is not None
            with self._write_lock:
                self.proc.stdin.write(dumps(message))
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self.death() from None

    def request(self, message: Message, on_message: Optional[Callable[[Message], None]] = None,
                poll: Optional[Callable[[int], None]] = None) -> Message:
        """Send ``message`` with a fresh id and wait for its ``result``; every other message
        for it goes to ``on_message``; ``poll(id)`` runs every 0.1 s (cancel checks). An
        ``error`` reply raises RuntimeClientError with the child's error class as ``kind``."""
        request_id = next(self._ids)
        box: queue.Queue = queue.Queue()
        with self._lock:
            if self._dead:
                raise self.death()
            self._pending[request_id] = box
        try:
            self.send({"id": request_id, **message})
            self._note(message)
            while True:
                try:
                    reply = box.get(timeout=0.1)
                except queue.Empty:
                    reply = None
                if poll is not None:
                    poll(request_id)
                if reply is _EOF:
                    raise self.death()
                if reply is None:
                    self._check_heartbeat()
                elif reply.get("type") == "result":
                    return reply
                elif reply.get("type") == "error":
                    if reply.get("error") == _PROTOCOL:  # the child may still work on it
                        with contextlib.suppress(RuntimeClientError):
                            self.send({"op": "cancel", "target": request_id})
                    raise RuntimeClientError(str(reply.get("message") or reply.get("error")),
                                             str(reply.get("error") or "RuntimeError"))
                elif on_message is not None:
                    on_message(reply)
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
            if message.get("op") in _HEAVY:
                self.activity = None  # idle again: a later death was not this request's

    def _check_heartbeat(self) -> None:
        silent = time.monotonic() - self.last_seen
        if silent > self.heartbeat_timeout and self.alive:
            self.kill()
            raise RuntimeClientError(
                f"The GeoChat runtime stopped answering (no heartbeat for "
                f"{self.heartbeat_timeout:g} s) and was stopped. {_AFTER} If this repeats, the "
                "machine may be out of memory or the model too large for it.", "RuntimeHung")

    def death(self) -> RuntimeClientError:
        """The error describing how the child ended (it is reaped first)."""
        code = self.returncode
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
                code = self.proc.returncode
            for thread in self._threads:
                thread.join(timeout=1)
        tail = self.stderr_tail()
        missing = "No module named" in tail
        doing = f" It was {self.activity}." if self.activity else ""
        message = (f"The GeoChat runtime process {describe_exit(code)}.{doing} QGIS is "
                   f"unaffected. {_AFTER}" + (f" Its last output: {tail}" if tail else ""))
        return RuntimeClientError(message, "RuntimeMissing" if missing else "RuntimeDied", code)

    def kill(self) -> None:
        """Kill the child now and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2)
        self._close_pipes()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to shut down (close its stdin); kill it when it has not within
        ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.send({"op": "shutdown"})
                self.proc.wait(timeout=timeout)
            except (RuntimeClientError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _close_pipes(self) -> None:
        assert self.proc is not None
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


@atexit.register
def _kill_live_children() -> None:
    for child in list(_LIVE):
        child.kill()
