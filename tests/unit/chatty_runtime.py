"""A real runtime child with one extra request, ``say``, for the protocol tests.

``{"op": "say", "lines": [...], "wait": S}`` writes each line as it is (``{id}`` replaced by
the request's id) on the protocol stream, then waits up to S seconds for a cancel and answers
``{"said": N, "cancelled": bool}``. Everything else is the real server (started like
``python -m geochat_qgis runtime serve``): the way to make a real child write a bad line.
Run as ``python chatty_runtime.py -m geochat_qgis runtime serve --heartbeat S``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from geochat_qgis.core.runtime.server import RequestContext, RuntimeServer


class ChattyServer(RuntimeServer):
    """The runtime server plus ``say``."""

    def _handlers(self):
        return {**super()._handlers(), "say": self._say}

    def _say(self, message: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        lines = [str(line).replace("{id}", str(ctx.request_id)) for line in message["lines"]]
        stream = self.writer._stream
        with self.writer._lock:
            for line in lines:
                stream.write(line + "\n")
            stream.flush()
        deadline = time.monotonic() + float(message.get("wait", 0))
        while time.monotonic() < deadline and not ctx.cancel.cancelled:
            time.sleep(0.02)
        return {"said": len(lines), "cancelled": ctx.cancel.cancelled}


def main() -> int:
    heartbeat = float(sys.argv[sys.argv.index("--heartbeat") + 1])
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return ChattyServer(out, heartbeat).serve(sys.stdin)


if __name__ == "__main__":
    sys.exit(main())
