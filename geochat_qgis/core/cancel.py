"""The cancel token every long step checks (standard library only: QGIS's side uses it too)."""
from __future__ import annotations

import threading

from .errors import Cancelled


class CancelToken:
    """Set from any thread; backends check it between tokens and between tiles."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`Cancelled` once :meth:`cancel` was called."""
        if self._event.is_set():
            raise Cancelled("Cancelled by the user; results finished so far are kept.")
