"""Starts chat questions and detect runs as QgsTasks over one cached, loaded backend."""
from __future__ import annotations

from typing import Any, Callable, Optional

from qgis.core import QgsApplication

from ..core.backends.factory import BackendCache, BackendSpec
from ..core.chat import ChatRequest, ask
from ..core.pipeline import Job, run_job
from .run_task import GeoChatTask

# more work on the worker thread once the result is in (e.g. writing the result file)
Finish = Optional[Callable[[Any], Any]]


class Runner:
    """One run at a time; the loaded model is kept for the next request (same spec)."""

    def __init__(self, runtime: Callable[[], str]) -> None:
        self._runtime = runtime  # "subprocess" | "inprocess", read at each load
        self.cache = BackendCache(factory=self._open)
        self.task: Optional[GeoChatTask] = None

    def _open(self, spec: BackendSpec):
        from ..core.runtime.backend import open_backend

        return open_backend(spec, self._runtime())

    @property
    def busy(self) -> bool:
        try:
            return self.task is not None and self.task.status() in (
                GeoChatTask.Queued, GeoChatTask.OnHold, GeoChatTask.Running)
        except RuntimeError:  # the finished task's C++ object is gone
            return False

    def start_chat(self, request: ChatRequest, spec: BackendSpec, finish: Finish = None) -> GeoChatTask:
        def work(cancel, on_token, _on_progress):
            reply = ask(request, self.cache.get(spec), on_token=on_token, cancel=cancel)
            return finish(reply) if finish else reply

        return self.start(f"GeoChat: {request.task}", work)

    def start_detect(self, job: Job, spec: BackendSpec, finish: Finish = None) -> GeoChatTask:
        def work(cancel, on_token, on_progress):
            backend = self.cache.get(spec)
            result = run_job(job, backend, cancel=cancel, on_token=on_token,
                             on_progress=lambda p: on_progress(p.done, p.total))
            return finish(result) if finish else result

        return self.start(f"GeoChat: {job.task} over {job.raster}", work)

    def start(self, description: str, work) -> GeoChatTask:
        """Run ``work(cancel, on_token, on_progress)`` as the current task."""
        self.task = GeoChatTask(description, work)
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def cancel(self) -> None:
        """Stop the current task between tokens or tiles. Only the core's token is set:
        QgsTask.cancel() on a task still queued has crashed QGIS 3.22 (seen in tests)."""
        if self.busy:
            self.task.cancel_token.cancel()

    def close(self, wait_ms: int = 15000) -> None:
        """Cancel what runs, wait for it to stop, and free the model (plugin unload)."""
        if self.busy:
            self.task.cancel_token.cancel()
            self.task.waitForFinished(wait_ms)
        self.cache.clear()
