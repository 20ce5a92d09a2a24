"""The QgsTask that runs slow work (a runtime request, pip) off the main thread.

The worker never touches widgets: it reports through signals, which Qt delivers on the main
thread (the task object lives there). Cancel sets a :class:`CancelToken` that the runtime client
polls (it asks the child to stop between tokens and tiles). A result that arrives with a cancel
(a cancelled run's finished tiles) is still delivered.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Optional

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..client import RuntimeClientError
from ..core.cancel import CancelToken  # stdlib only
from ..core.errors import Cancelled, GeoChatError  # stdlib only

log = logging.getLogger(__name__)


# work(cancel, on_token(index, piece), on_progress(done, total)) -> result
Work = Callable[[CancelToken, Callable[[int, str], None], Callable[[int, int], None]], Any]


class GeoChatTask(QgsTask):
    """Runs ``work`` in a QGIS worker thread. Runtime events reach the main thread as
    ``tokenReceived``, ``tileProgress``, ``tileFailed`` and ``statusChanged``."""

    tokenReceived = pyqtSignal(str)  # noqa: N815 - Qt naming
    tileProgress = pyqtSignal(int, int)  # noqa: N815
    tileFailed = pyqtSignal(str, str)  # noqa: N815 - (tile id, message)
    statusChanged = pyqtSignal(str)  # noqa: N815
    resultReady = pyqtSignal(object)  # noqa: N815
    failed = pyqtSignal(str)

    def __init__(self, description: str, work: Work, quiet: bool = False) -> None:
        """``quiet``: a short background check (runtime probe, model list) that QGIS may
        cancel without asking when it quits, hidden from the task list where QGIS can."""
        flags = QgsTask.Flag.CanCancel
        if quiet:
            flags |= QgsTask.Flag.CancelWithoutPrompt
            hidden = getattr(QgsTask.Flag, "Hidden", None)  # QGIS >= 3.26
            flags = flags | hidden if hidden is not None else flags
        super().__init__(description, flags)
        self.work = work
        self.cancel_token = CancelToken()
        self.result_value: Optional[Any] = None
        self.error: Optional[str] = None

    def run(self) -> bool:  # worker thread
        try:
            self.cancel_token.raise_if_cancelled()  # cancelled while still queued
            self.result_value = self.work(self.cancel_token, self._on_token, self._on_progress)
        except Cancelled:
            self.error = "Cancelled."
            return False
        except RuntimeClientError as exc:
            self.error = "Cancelled." if exc.kind == "Cancelled" else exc.message
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

    def on_event(self, event: dict[str, Any]) -> None:
        """A runtime event (worker thread) as the matching signal."""
        kind = event.get("type")
        if kind == "token":
            self.tokenReceived.emit(str(event.get("text") or ""))
        elif kind == "progress":
            self._on_progress(int(event.get("done") or 0), int(event.get("total") or 0))
        elif kind == "tile_failed":
            self.tileFailed.emit(str(event.get("tile") or ""), str(event.get("message") or ""))
        elif kind == "status":
            self.statusChanged.emit(str(event.get("message") or ""))

    def _on_token(self, _index: int, piece: str) -> None:
        self.tokenReceived.emit(piece)

    def _on_progress(self, done: int, total: int) -> None:
        if total:
            self.setProgress(100.0 * done / total)
        self.tileProgress.emit(done, total)
