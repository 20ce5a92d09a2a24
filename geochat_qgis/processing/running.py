"""Running a core Job under a QgsProcessingFeedback: progress per tile, cancel, clear errors."""
from __future__ import annotations

import threading
from typing import Optional

from qgis.core import QgsProcessingException, QgsProcessingFeedback
from qgis.PyQt.QtCore import Qt

from ..core.threads import CallerThread, in_python_thread

MAX_REPORTED_FAILURES = 5

# A batch (many rasters, many prompts) loads its model once: the last model stays loaded per
# runtime, and runs on it take turns (llama.cpp and torch models are not shared across threads).
_CACHES: dict = {}
_RUN_LOCK = threading.Lock()


def loaded_backend(spec, runtime: str):
    """The loaded backend for ``spec`` in ``runtime``, reused from the previous run when equal."""
    from ..core.backends.factory import BackendCache
    from ..core.runtime.backend import open_backend

    cache = _CACHES.get(runtime)
    if cache is None:
        cache = _CACHES[runtime] = BackendCache(lambda s: open_backend(s, runtime))
    return cache.get(spec)


def release_models() -> None:
    """Free every model Processing keeps loaded (provider unload)."""
    with _RUN_LOCK:
        for cache in _CACHES.values():
            cache.clear()
        _CACHES.clear()


def run_with_feedback(job, runtime: str, feedback: Optional[QgsProcessingFeedback]):
    """``run_job(job)`` with its backend opened in ``runtime``; returns the JobResult.

    The job runs on a Python thread (see core.threads: pyproj on QGIS's pooled
    worker threads crashes the second run).

    Cancelling ``feedback`` cancels the core's CancelToken at once (the backend stops between
    tokens, the pipeline before the next tile); the result then holds the finished tiles.
    Raises QgsProcessingException with the core's message when the run cannot start, stops on
    an error, or no tile could be processed.
    """
    from ..core.backends.base import CancelToken
    from ..core.errors import GeoChatError
    from ..core.pipeline import run_job

    feedback = feedback or QgsProcessingFeedback()
    cancel = CancelToken()
    # direct: cancel() is called from the GUI thread while this one runs the model
    feedback.canceled.connect(cancel.cancel, Qt.ConnectionType.DirectConnection)
    if feedback.isCanceled():
        cancel.cancel()

    def on_progress(progress) -> None:
        if progress.total:
            feedback.setProgress(100.0 * progress.done / progress.total)

    caller = CallerThread()

    def run():
        with _RUN_LOCK:
            backend = loaded_backend(job.backend, runtime)
            return run_job(job, backend, on_progress=caller.wrap(on_progress), cancel=cancel)

    feedback.pushInfo(f"Model: {job.backend.kind} {job.backend.model}")
    try:
        result = in_python_thread(run, caller=caller)
    except GeoChatError as exc:
        raise QgsProcessingException(str(exc)) from exc
    finally:
        feedback.canceled.disconnect(cancel.cancel)
    report(result, feedback)
    return result


def report(result, feedback: QgsProcessingFeedback) -> None:
    """Say what the run did; QgsProcessingException when it produced nothing usable."""
    failed = {failure.tile_id for failure in result.failures}
    feedback.pushInfo(
        f"Tiles: {result.tiles_done} done, {result.tiles_skipped} skipped (nodata), "
        f"{len(failed)} failed of {result.tiles_planned}; detections: "
        f"{len(result.detections)}; {result.seconds:.1f} s")
    for failure in result.failures[:MAX_REPORTED_FAILURES]:
        feedback.pushWarning(f"Tile {failure.tile_id}: {failure.message}")
    if result.cancelled:
        feedback.pushWarning("Cancelled: the results of the finished tiles are kept.")
        return
    if result.error:
        raise QgsProcessingException(
            f"{result.error} (stopped after {result.tiles_done} of {result.tiles_planned} "
            "tiles; nothing was written)")
    if result.failures and not result.tiles_done:
        raise QgsProcessingException(f"No tile could be processed: {result.failures[0].message}")
    if not result.tiles_done:
        feedback.pushWarning("Every tile was skipped (nodata): the output is empty.")
