"""The dock's one task at a time: planning, a run or a question, each a QgsTask whose work
calls the shared runtime client (the model stays loaded in the runtime child between them)."""
from __future__ import annotations

from typing import Any, Callable, Optional

from qgis.core import QgsApplication

from ..client import shared_client
from .run_task import GeoChatTask, Work


def client() -> Any:
    """The process-wide runtime client the dock and Processing share."""
    return shared_client()


class Runner:
    """Starts the dock's tasks; ``busy`` while one is queued or running."""

    def __init__(self) -> None:
        self.task: Optional[GeoChatTask] = None

    @property
    def busy(self) -> bool:
        try:
            return self.task is not None and self.task.status() in (
                GeoChatTask.TaskStatus.Queued, GeoChatTask.TaskStatus.OnHold,
                GeoChatTask.TaskStatus.Running)
        except RuntimeError:  # the finished task's C++ object is gone
            return False

    def start(self, description: str, work: Work) -> GeoChatTask:
        """Run ``work(cancel, on_token, on_progress)`` as the current task."""
        return self._add(GeoChatTask(description, work))

    def start_request(self, description: str, call: Callable[[GeoChatTask, Any], Any]) -> GeoChatTask:
        """A task running ``call(task, cancel)`` (e.g. ``client().run(request,
        task.on_event, cancel)``): runtime events reach the main thread as the task's signals."""
        task = GeoChatTask(description, lambda cancel, _token, _progress: call(task, cancel))
        return self._add(task)

    def _add(self, task: GeoChatTask) -> GeoChatTask:
        self.task = task
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel(self) -> None:
        """Stop the current task: the runtime stops between tokens or tiles and keeps the
        finished tiles. Only the token is set: QgsTask.cancel() on a task still queued has
        crashed QGIS 3.22 (seen in tests)."""
        if self.busy:
            self.task.cancel_token.cancel()

    def close(self, wait_ms: int = 15000) -> None:
        """Cancel what runs and wait for it to stop (dock teardown)."""
        if self.busy:
            self.task.cancel_token.cancel()
            self.task.waitForFinished(wait_ms)
