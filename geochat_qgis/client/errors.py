"""The client's errors: plain text that names the problem and what to do."""
from __future__ import annotations

from typing import Optional

INSTALL_HINT = ("Install it from the dock's runtime button or Raster > GeoChat > Install model "
                "dependencies..., or point GEOCHAT_RUNTIME_PYTHON at a Python that has "
                "GeoChat's core packages.")


class RuntimeClientError(Exception):
    """A runtime request failed. ``kind`` is the child's error class (e.g. ``RasterError``,
    ``ModelError``, ``Cancelled``) or ``"RuntimeDied"`` / ``"RuntimeHung"`` when the child
    process itself failed (``"RuntimeProtocol"``: it sent a line that is no protocol message);
    ``exit_code`` is set when it died."""

    def __init__(self, message: str, kind: str = "RuntimeError",
                 exit_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.exit_code = exit_code

    @property
    def crashed(self) -> bool:
        """True when the child process died or hung (not an error it reported itself)."""
        return self.kind in ("RuntimeDied", "RuntimeHung")


class RuntimeMissing(RuntimeClientError):
    """No usable runtime interpreter: not installed, or it lacks GeoChat's core packages."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "RuntimeMissing")
