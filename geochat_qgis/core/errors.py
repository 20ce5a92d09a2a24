"""Errors the core raises: each carries a message a user can act on."""
from __future__ import annotations


class GeoChatError(Exception):
    """Base class: the message names the problem and what to do about it."""


class RasterError(GeoChatError):
    """A raster cannot be read, or the requested area or bands do not fit it."""


class ParseError(GeoChatError):
    """Model output could not be parsed at all."""


class BackendError(GeoChatError):
    """A model backend could not load or generate."""


class ModelError(GeoChatError):
    """A model file or checkpoint is missing, corrupt or of the wrong kind."""


class ExportError(GeoChatError):
    """Results could not be written."""


class Cancelled(GeoChatError):
    """The user cancelled the job; results so far are kept by the caller."""
