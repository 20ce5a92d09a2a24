"""Ctrl-C and SIGTERM end a long command cleanly: finished work is written, then it exits.

The first SIGINT or SIGTERM sets the command's cancel token (the run stops after the tiles in
progress and returns what is finished); a second SIGINT interrupts at once (the pipeline still
returns what is finished). While results are being written, signals wait until the file is in
place, so an interrupt never costs the results themselves.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

# exit status of a command stopped by each signal (the shell's 128 + number)
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupts:
    """Which signal stopped the command (``signum``), if any."""

    def __init__(self, cancel: Any) -> None:
        self.cancel = cancel
        self.signum: Optional[int] = None
        self.shielded = False
        self.pending = False

    @property
    def exit_status(self) -> Optional[int]:
        return EXIT_STATUS.get(self.signum) if self.signum is not None else None

    def handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
            if self.cancel is not None:
                self.cancel.cancel()
        if self.shielded:
            self.pending = True
            print("\nwriting the finished results first...", file=sys.stderr, flush=True)
            return
        if first:
            print(f"\n{signal.Signals(signum).name}: stopping after the tiles in progress; the "
                  f"finished ones will be written (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    @contextmanager
    def shield(self) -> Iterator[None]:
        """Signals arriving in this block are remembered, not raised (a file is being written)."""
        self.shielded = True
        try:
            yield
        finally:
            self.shielded = False


@contextmanager
def cancel_on_signals(cancel: Any) -> Iterator[Interrupts]:
    """SIGINT and SIGTERM cancel ``cancel`` (a CancelToken) while the block runs.

    Outside the main thread (signals cannot be caught there) the block runs unchanged.
    """
    state = Interrupts(cancel)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {s: signal.signal(s, state.handle) for s in EXIT_STATUS}
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
