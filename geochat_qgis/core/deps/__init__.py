"""The dependency installer: a plugin-managed Python environment outside the plugin folder.

``environment`` finds/creates the managed venv matched to the running Python and platform,
``requirements`` says what each backend needs (CUDA or CPU builds from ``gpu``), ``pip`` runs
installs with live output and verifies imports in a fresh process, ``diagnostics`` writes the
report users paste into bug reports.
"""
from __future__ import annotations

from ..errors import GeoChatError


class DepsError(GeoChatError):
    """Installing or checking a backend's Python packages failed."""
