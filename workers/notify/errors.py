"""The notify package's errors; both are permanent, because only a configuration change helps."""

from __future__ import annotations

from workers.errors import PermanentError


class TemplateError(PermanentError):
    """Raised when a notice template cannot be read or rendered; names the template file."""


class SmtpUrlError(PermanentError):
    """Raised when CALHOOK_SMTP_URL cannot be used; never quotes the password."""
