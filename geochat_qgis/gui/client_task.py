"""A runtime-client call (plan, get, delete) in a QGIS worker thread, its events and its end
back on the main thread as signals."""
from __future__ import annotations

import threading
import traceback
from typing import Any, Callable

from qgis.core import QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..client import RuntimeClientError

# work(stop, emit) -> result; stop: a threading.Event, emit: an event dict to the main thread
ClientWork = Callable[[threading.Event, Callable[[dict], None]], Any]


class ClientTask(QgsTask):
    """Runs a runtime-client call in a QGIS worker; events and the end come back as signals."""

    progressed = pyqtSignal(object)  # a get_model event (or the plan)
    done = pyqtSignal(object, str)  # result (None when it failed), error text ("" when ok)

    def __init__(self, description: str, work: ClientWork) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.work, self.stop = work, threading.Event()
        self.result: Any = None
        self.error = ""

    def run(self) -> bool:  # worker thread
        try:
            self.result = self.work(self.stop, self.progressed.emit)
        except RuntimeClientError as exc:
            self.error = exc.message  # a cancel says "Cancelled during <phase>; ..."
            return False
        except Exception as exc:  # noqa: BLE001 - never take QGIS down; say what happened
            QgsMessageLog.logMessage(traceback.format_exc(), "GeoChat")
            self.error = f"Unexpected error ({type(exc).__name__}: {exc}); details in the GeoChat log."
            return False
        return True

    def finished(self, ok: bool) -> None:  # main thread
        self.done.emit(self.result if ok else None, "" if ok else (self.error or "Cancelled."))

    def cancel(self) -> None:
        self.stop.set()
        super().cancel()
