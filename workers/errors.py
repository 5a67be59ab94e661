"""The workers' error tree."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error raised by calhook's worker side."""


class DuplicateHandler(WorkerError):
    """Raised at import when a second handler registers a name already taken."""


class UnknownHandler(WorkerError):
    """Raised when a task names a handler that no loaded module registered."""


class HandlerModuleError(WorkerError):
    """Raised when a module listed in CALHOOK_HANDLER_MODULES cannot be imported."""
