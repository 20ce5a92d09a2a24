"""Run core work on a thread Python itself created.

QGIS runs QgsTask and Processing work on Qt's pooled threads, where Python's thread state comes
and goes with each call into Python. pyproj keeps a PROJ context per Python thread: on a pooled
Qt thread that context can be freed between two tasks while PROJ still points at it, and the
next task crashes QGIS (seen as a segfault in ``pyproj.CRS``). A thread that Python starts and
ends owns its context for its whole life.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class CallerThread:
    """Runs callbacks made on the Python thread in the thread waiting for it instead (as Qt's
    blocking queued connection does): progress then reaches a QgsProcessingFeedback from the
    thread it expects, and a cancel made in response is seen before the next step."""

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
            return outcome["value"]

        return relayed

    def pump(self, timeout: float) -> None:
        """Run the callback waiting, or wait up to ``timeout`` seconds for one."""
        try:
            callback, args, kwargs, done, outcome = self._calls.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            outcome["value"] = callback(*args, **kwargs)
        except BaseException as exc:  # raised in the thread that made the call
            outcome["error"] = exc
        done.set()


def in_python_thread(function: Callable[..., T], *args: Any,
                     caller: Optional[CallerThread] = None, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` on a new Python thread; returns its result or raises its
    exception in the caller. While it runs, the caller runs the callbacks ``caller`` relays."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # handed back to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="geochat-work", daemon=True)
    thread.start()
    while thread.is_alive():
        if caller is not None:
            caller.pump(0.05)
        else:
            thread.join(0.05)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
