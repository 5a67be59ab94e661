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


class HandlerSignatureError(WorkerError, TypeError):
    """Raised at import when a handler's event parameter cannot take the events of its types."""


class HandlerError(WorkerError):
    """Base of the errors a handler raises to tell calhook how to go on."""


class PermanentError(HandlerError):
    """Raised by a handler when trying again cannot help (e.g. the CRM answered 400).

    The (event, handler) goes straight to the dead-letter store, skipping the retry schedule.
    """


class TransientError(HandlerError):
    """Raised by a handler when a quick retry may help (a dropped connection, a 503)."""


class RetryLater(HandlerError):
    """Raised by a handler when the other side said when to come back (a 429 ``Retry-After``).

    The next attempt is scheduled no earlier than ``after_s`` seconds from now.
    """

    def __init__(self, message: str, after_s: float) -> None:
        super().__init__(message)
        self.after_s = after_s


class Defer(HandlerError):
    """Raised by a handler (or what it calls) that cannot start its work yet: a rate limit is
    used up, a resource is busy.

    Waiting is not failing: the same attempt runs again after ``after_s`` seconds, and no step of
    the retry schedule is spent.
    """

    def __init__(self, message: str, after_s: float) -> None:
        super().__init__(message)
        self.after_s = after_s
