"""Running a request in the GeoChat runtime (the shared child) under a QgsProcessingFeedback:
progress per tile, tile failures as warnings, cancel, clear errors.

QGIS's process holds only QGIS: the core runs in the runtime child through
``geochat_qgis.client`` (standard library only), which the dock uses too (one child, one loaded
model for both; a batch loads its model once).
"""
from __future__ import annotations

from typing import Any, Optional

from qgis.core import QgsProcessingException, QgsProcessingFeedback

from ..client import RunResult, RuntimeClient, RuntimeClientError, runtime_state, shared_client

MAX_REPORTED_FAILURES = 5


def ready_client(backend: Optional[str] = None) -> RuntimeClient:
    """The shared runtime client; QgsProcessingException naming the menu entry that installs
    the runtime when there is none (checked without starting the child)."""
    state = runtime_state(backend=backend)
    if not state.ready:
        raise QgsProcessingException(state.message)
    return shared_client()


def call(method, *args: Any, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)`` on the client, its errors as QgsProcessingException."""
    try:
        return method(*args, **kwargs)
    except RuntimeClientError as exc:
        raise QgsProcessingException(exc.message) from None


class FeedbackEvents:
    """The runtime's events on a feedback: progress, tile failures (the first few as warnings,
    then a count), status lines."""

    def __init__(self, feedback: QgsProcessingFeedback) -> None:
        self.feedback = feedback
        self.failures = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "progress" and event.get("total"):
            self.feedback.setProgress(100.0 * event["done"] / event["total"])
        elif kind == "tile_failed":
            self.failures += 1
            if self.failures <= MAX_REPORTED_FAILURES:
                self.feedback.pushWarning(f"Tile {event.get('tile')}: {event.get('message')}")
        elif kind == "status" and event.get("message"):
            self.feedback.pushInfo(str(event["message"]))


def run_request(request: dict[str, Any], feedback: Optional[QgsProcessingFeedback]
                ) -> RunResult:
    """Run ``request`` in the runtime; the RunResult once tiles ran (see :func:`report`).

    Cancelling ``feedback`` reaches the child at once (the model stops between tokens, the job
    before the next tile); the finished tiles are written. QgsProcessingException with the
    runtime's message when the run cannot start (bad raster, model, area, output, no runtime).
    """
    feedback = feedback or QgsProcessingFeedback()
    model = request.get("model") or {}
    client = ready_client(model.get("backend"))
    feedback.pushInfo("Model: " + str(model.get("server_model") or model.get("model_path")
                                      or model.get("name")))
    events = FeedbackEvents(feedback)
    result = call(client.run, request, on_event=events, cancel=feedback.isCanceled)
    report(result, feedback)
    return result


def report(result: RunResult, feedback: QgsProcessingFeedback) -> None:
    """Say what the run did; QgsProcessingException when it wrote nothing (every tile failed,
    stopped before the first tile, or an existing output kept as it was)."""
    failed = result.tiles_failed or len({f.get("tile") for f in result.failures})
    feedback.pushInfo(
        f"Tiles: {result.tiles_done} done, {result.tiles_skipped} skipped (nodata), {failed} "
        f"failed of {result.tiles_planned}; features: {result.features}; "
        f"{result.seconds:.1f} s; model: {result.model}")
    if len(result.failures) > MAX_REPORTED_FAILURES:
        feedback.pushWarning(f"... and {len(result.failures) - MAX_REPORTED_FAILURES} more "
                             "tile failures.")
    if failed and result.tiles_done:
        feedback.pushWarning(f"{failed} of {result.tiles_planned} tiles failed: the output has "
                             "nothing from their areas.")
    if not result.tiles_done:
        if result.output is None or result.failures or result.cancelled or result.error:
            raise QgsProcessingException(nothing_written(result))
        feedback.pushWarning(result.note or "Every tile was skipped (nodata): the output is "
                             "empty.")
    elif result.cancelled:
        feedback.pushWarning("Cancelled: " + (result.note or f"the {result.tiles_done} "
                                              "finished tiles were written."))
    elif result.error:
        feedback.reportError(f"{result.error} (stopped after {result.tiles_done} of "
                             f"{result.tiles_planned} tiles). {result.note}", False)
    elif result.note:
        feedback.pushWarning(result.note)


def nothing_written(result: RunResult) -> str:
    """Why a run that processed no tile wrote no (new) output, in one message."""
    kept = f" ({result.note})" if result.note else ""
    if result.cancelled:
        return f"Cancelled before the first tile finished: nothing was written{kept}."
    if result.failures:
        return f"No tile could be processed: {result.failures[0].get('message')}{kept}"
    if result.error:
        return f"{result.error}: no tile was processed{kept}"
    return f"Every tile of the area is nodata{kept}."
