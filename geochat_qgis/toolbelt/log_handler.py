"""A standard ``logging.Handler`` that writes into the QGIS message log under "GeoChat"."""
from __future__ import annotations

import logging

from qgis.core import Qgis, QgsMessageLog

LOG_TAG = "GeoChat"
LOGGER_NAME = "geochat_qgis"

_LEVELS = (
    (logging.ERROR, Qgis.MessageLevel.Critical),
    (logging.WARNING, Qgis.MessageLevel.Warning),
    (logging.INFO, Qgis.MessageLevel.Info),
)


def qgis_level(levelno: int) -> "Qgis.MessageLevel":
    """The QGIS message level for a Python logging level."""
    for threshold, level in _LEVELS:
        if levelno >= threshold:
            return level
    return Qgis.MessageLevel.Info


class QgisLogHandler(logging.Handler):
    """Sends records to QgsMessageLog (thread-safe: QgsMessageLog queues across threads)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            QgsMessageLog.logMessage(self.format(record), LOG_TAG, qgis_level(record.levelno), notifyUser=False)
        except Exception:  # noqa: BLE001 - a log handler must never raise
            self.handleError(record)


def install_log_handler(level: int = logging.INFO) -> QgisLogHandler:
    """Attach a handler to the package logger; returns it so ``unload`` can remove it."""
    handler = QgisLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def remove_log_handler(handler: QgisLogHandler) -> None:
    logging.getLogger(LOGGER_NAME).removeHandler(handler)
