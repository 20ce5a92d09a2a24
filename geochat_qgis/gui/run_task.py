"""The QgsTask that runs a job or a chat question off the main thread.

The worker never touches widgets: it reports through signals, which Qt delivers on the main
thread (the task object lives there). Cancel sets the core's CancelToken, honoured between tokens
and between tiles. Results so far (a cancelled or failed detect run) still arrive.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Optional

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..core.backends.base import CancelToken
from ..core.errors import Cancelled, GeoChatError
from ..core.threads import in_python_thread

log = logging.getLogger(__name__)

# work(cancel, on_token(index, piece), on_progress(done, total)) -> result
Work = Callable[[CancelToken, Callable[[int, str], None], Callable[[int, int], None]], Any]


class GeoChatTask(QgsTask):
    """Runs ``work`` in a QGIS worker thread."""

    tokenReceived = pyqtSignal(str)  # noqa: N815 - Qt naming
    tileProgress = pyqtSignal(int, int)  # noqa: N815
    resultReady = pyqtSignal(object)  # noqa: N815
    failed = pyqtSignal(str)

    def __init__(self, description: str, work: Work) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.work = work
        self.cancel_token = CancelToken()
        self.result_value: Optional[Any] = None
        self.error: Optional[str] = None

    def run(self) -> bool:  # worker thread
        try:
            self.cancel_token.raise_if_cancelled()  # cancelled while still queued
            self.result_value = in_python_thread(
                self.work, self.cancel_token, self._on_token, self._on_progress)
        except Cancelled:
            self.error = "Cancelled."
            return False
        except GeoChatError as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - never take QGIS down; say what happened
            log.error("GeoChat task failed:\n%s", traceback.format_exc())
            self.error = f"Unexpected error ({type(exc).__name__}: {exc}); details in the GeoChat log."
            return False
        return True

    def cancel(self) -> None:
        self.cancel_token.cancel()
        super().cancel()

    def finished(self, ok: bool) -> None:  # main thread
        if self.result_value is not None:
            self.resultReady.emit(self.result_value)
        if not ok:
            self.failed.emit(self.error or "Cancelled.")

    def _on_token(self, _index: int, piece: str) -> None:
        self.tokenReceived.emit(piece)

    def _on_progress(self, done: int, total: int) -> None:
        if total:
            self.setProgress(100.0 * done / total)
        self.tileProgress.emit(done, total)
