"""core.threads: core work on a Python thread, callbacks relayed to the caller.

Why it exists: tests/qgis/test_processing.py::test_repeated_exports_on_the_task_manager.
"""
from __future__ import annotations

import threading

import pytest

from geochat_qgis.core.threads import CallerThread, in_python_thread


def test_in_python_thread_returns_raises_and_relays_to_the_caller():
    caller = CallerThread()
    seen: list[tuple[str, int]] = []
    relay = caller.wrap(lambda value: seen.append((threading.current_thread().name, value)))

    def work(count: int) -> str:
        for value in range(count):
            relay(value)
        return threading.current_thread().name

    worker = in_python_thread(work, 3, caller=caller)
    assert worker == "geochat-work" and worker != threading.current_thread().name
    assert seen == [(threading.current_thread().name, value) for value in range(3)]

    def fail() -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        in_python_thread(fail)


def test_a_relayed_callback_error_reaches_the_worker():
    caller = CallerThread()
    relay = caller.wrap(lambda: 1 / 0)

    def work() -> str:
        try:
            relay()
        except ZeroDivisionError:
            return "caught"
        return "not raised"

    assert in_python_thread(work, caller=caller) == "caught"
