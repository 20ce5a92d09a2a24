"""Run core work on a thread Python started, never directly on a QGIS worker thread.

QGIS runs tasks and Processing algorithms on QThreadPool threads. Each time such a thread enters
Python it gets a fresh Python thread state, dropped again when the call returns; pyproj (3.7+)
keeps its per-thread PROJ context pointer in a thread-specific key but the object that frees the
context in a ``threading.local`` of that thread state. When the state is dropped the context is
freed while the key still points at it, and the next pyproj call on the same pooled thread (the
next task or algorithm run) uses freed memory: a segfault in ``proj_as_wkt``. A thread started
by Python keeps one thread state for its whole life, so its context lives exactly as long as it.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class CallerThread:
    """Runs callbacks made on the Python thread in the thread waiting for it instead (as Qt's
    blocking queued connection does): progress reports then reach a QgsProcessingFeedback from
    the thread it expects, and a cancel made in response is seen before the next step."""

    def __init__(self) -> None:
        self._calls: queue.Queue = queue.Queue()

    def wrap(self, callback: Callable[..., T]) -> Callable[..., T]:
        """``callback`` as a function that, called on any thread, runs it on the waiting one."""

        def relayed(*args: Any, **kwargs: Any) -> T:
            done, outcome = threading.Event(), {}
            self._calls.put((callback, args, kwargs, done, outcome))
            done.wait()
            if "error" in outcome:
                raise outcome["error"]
            return outcome["result"]

        return relayed

    def pump(self, timeout: float) -> None:
        """Run the callbacks waiting, or wait up to ``timeout`` seconds for one."""
        try:
            callback, args, kwargs, done, outcome = self._calls.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            outcome["result"] = callback(*args, **kwargs)
        except BaseException as exc:  # raised in the thread that made the call
            outcome["error"] = exc
        done.set()


def in_python_thread(function: Callable[..., T], *args: Any,
                     caller: Optional[CallerThread] = None, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` run on a new Python thread; waits for it (running the
    callbacks ``caller`` relays meanwhile) and returns its result or raises its exception.
    Create no Qt objects inside ``function``: they would belong to a thread without an event
    loop."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    name = f"geochat-{getattr(function, '__name__', 'work')}"
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        if caller is not None:
            caller.pump(0.05)
        else:
            thread.join(0.05)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
