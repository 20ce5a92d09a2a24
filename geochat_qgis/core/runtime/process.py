"""The parent's handle on one runtime child: start it, talk to it, notice when it dies or hangs.

A dead child is always reaped (no zombie) and described in words: killed (SIGKILL, which is what
the out-of-memory killer sends), crashed in native code (SIGSEGV, SIGABRT...), exited, or
silent for longer than the heartbeat timeout (then it is killed).
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import BackendError
from . import protocol

PACKAGE_PARENT = Path(__file__).resolve().parents[3]  # the folder holding geochat_qgis/
_EOF = object()
_LIVE: "weakref.WeakSet[RuntimeProcess]" = weakref.WeakSet()
_NATIVE_CRASHES = {"SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"}


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
            return ("was killed (SIGKILL). The system's out-of-memory killer does this when "
                    "memory runs out: the model may need more RAM than is free")
        if name in _NATIVE_CRASHES:
            return f"crashed ({name}) in native code (llama.cpp, torch or a GPU driver)"
        return f"was stopped by {name}"
    if code in (0xC0000005, 0xC00000FD, 0xC0000409):  # Windows: access violation, stack
        return f"crashed (Windows status {code:#x}) in native code"
    return f"exited with code {code}" if code else "exited"


class RuntimeProcess:
    """One child running ``python -m geochat_qgis runtime serve``."""

    def __init__(self, python: str, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 30.0, startup_timeout: float = 120.0) -> None:
        self.python = python
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.info: dict[str, Any] = {}
        self._messages: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._threads: list[threading.Thread] = []
        self._last_seen = 0.0

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the child and wait for its ``ready`` line; BackendError when it cannot start."""
        # the plugin's own package first, then whatever made its dependencies importable here
        path = os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
        env.pop("PYTHONHOME", None)
        command = [self.python, "-m", "geochat_qgis", "runtime", "serve",
                   "--heartbeat", str(self.heartbeat_interval)]
        extra: dict[str, Any] = {"start_new_session": True}
        if sys.platform == "win32":
            extra = {"creationflags": 0x08000000}  # CREATE_NO_WINDOW: no console inside QGIS
        try:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, **extra)
        except OSError as exc:
            raise BackendError(
                f"Could not start the model runtime with {self.python} ({exc}). Install the "
                "backend's packages (`python -m geochat_qgis deps install BACKEND`) or switch "
                "the runtime to in-process."
            ) from exc
        _LIVE.add(self)
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True, name="geochat-rt-out"),
            threading.Thread(target=self._read_stderr, daemon=True, name="geochat-rt-err"),
        ]
        for thread in self._threads:
            thread.start()
        self._last_seen = time.monotonic()
        saved, self.heartbeat_timeout = self.heartbeat_timeout, self.startup_timeout
        try:
            ready = self.receive()
        finally:
            self.heartbeat_timeout = saved
        if ready.get("type") != "ready":
            self.kill()
            raise BackendError(f"The model runtime started with an unexpected message: {ready}")
        self.info = ready

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                try:
                    self._messages.put(json.loads(line))
                except ValueError:
                    self._stderr.append(line.rstrip())  # not protocol: keep it for the report
        except (OSError, ValueError):
            pass  # pipe closed under us
        self._messages.put(_EOF)

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                self._stderr.append(line.rstrip())
        except (OSError, ValueError):
            pass

    def stderr_tail(self, lines: int = 8) -> str:
        return " | ".join(list(self._stderr)[-lines:])

    def send(self, message: dict[str, Any]) -> None:
        if not self.alive:
            raise self._death()
        try:
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write(protocol.dumps(message))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._death() from None

    def receive(self, poll: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """The next message that is not a heartbeat. ``poll`` runs while waiting (cancel checks).

        BackendError when the child dies or stays silent past the heartbeat timeout.
        """
        while True:
            try:
                message = self._messages.get(timeout=0.1)
            except queue.Empty:
                message = None
            if message is _EOF:
                raise self._death()
            now = time.monotonic()
            if poll is not None:
                poll()
            if message is not None:
                self._last_seen = now
                if message.get("type") != "heartbeat":
                    return message
                continue
            if now - self._last_seen > self.heartbeat_timeout:
                self.kill()
                raise BackendError(
                    f"The model runtime process stopped answering (no heartbeat for "
                    f"{self.heartbeat_timeout:g} s) and was stopped. The next request starts a "
                    "fresh runtime; if this repeats, the machine may be out of memory or the "
                    "model too large for it."
                )

    def _death(self) -> BackendError:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
                code = self.proc.returncode
            for thread in self._threads:
                thread.join(timeout=1)
            self._close_pipes()
        tail = self.stderr_tail()
        return BackendError(
            f"The model runtime process {describe_exit(code)}. QGIS is unaffected and results "
            "finished so far are kept; the next request starts a fresh runtime."
            + (f" Its last output: {tail}" if tail else "")
        )

    def kill(self) -> None:
        """Kill the child now and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for thread in self._threads:
            thread.join(timeout=1)
        self._close_pipes()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to shut down; kill it when it does not within ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.send({"op": "shutdown"})
                self.proc.wait(timeout=timeout)
            except (BackendError, subprocess.TimeoutExpired):
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
    for process in list(_LIVE):
        process.kill()
