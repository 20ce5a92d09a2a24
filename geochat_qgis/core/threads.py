"""Run core work on a thread Python itself created.

QGIS runs QgsTask and Processing work on Qt's pooled threads, where Python's thread state comes
and goes with each call into Python. pyproj keeps a PROJ context per Python thread: on a pooled
Qt thread that context can be freed between two tasks while PROJ still points at it, and the
next task crashes QGIS (seen as a segfault in ``pyproj.CRS``). A thread that Python starts and
ends owns its context for its whole life.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def in_python_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` on a new Python thread; returns its result or raises its
    exception in the caller."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # handed back to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="geochat-work", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
