"""The package's error tree.

Payloads carry personal data (names, e-mails, phone numbers), so no error of this package ever
holds an input value: ``.errors`` keeps only ``loc``, ``msg`` and ``type``, and ``str(exc)`` is
built from those alone. Logs and HTTP answers may therefore show errors verbatim.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

ErrorDetail = dict[str, str]
"""One problem: ``loc`` (dotted path, ``""`` for the whole body), ``msg`` and ``type``."""

_MAX_IN_MESSAGE = 5
_REDACTED = "<redacted>"


class SchemaError(ValueError):
    """Raised when a Calenso body cannot be turned into a typed event."""

    def __init__(self, message: str, errors: Iterable[Mapping[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.errors: list[ErrorDetail] = [
            {"loc": str(e["loc"]), "msg": str(e["msg"]), "type": str(e["type"])} for e in errors
        ]

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps ``.errors`` when Celery or multiprocessing pickles the exception.
        return (type(self), (self.message, self.errors))


class EnvelopeError(SchemaError):
    """Raised when the body is not a Calenso envelope: no object, no usable ``type`` or ``data``."""


class PayloadError(SchemaError):
    """Raised when an event's ``data`` (or its ``created``) fails the schema of its family."""


def summarise(errors: list[ErrorDetail]) -> str:
    """Join ``errors`` into one line for a message, naming at most a handful of them."""
    parts = [f"{e['loc'] or '(body)'}: {e['msg']}" for e in errors[:_MAX_IN_MESSAGE]]
    if len(errors) > _MAX_IN_MESSAGE:
        parts.append(f"and {len(errors) - _MAX_IN_MESSAGE} more")
    return "; ".join(parts)


def strip_validation_errors(exc: ValidationError) -> list[ErrorDetail]:
    """Return pydantic's errors reduced to ``loc``/``msg``/``type``, without any input value."""
    stripped: list[ErrorDetail] = []
    for error in exc.errors(include_url=False, include_context=False):
        msg = error["msg"]
        value = error.get("input")
        # Pydantic's own messages do not quote the input, but a validator's message might.
        if isinstance(value, str) and len(value) >= 3 and value in msg:
            msg = msg.replace(value, _REDACTED)
        stripped.append(
            {
                "loc": ".".join(str(part) for part in error["loc"]),
                "msg": msg,
                "type": error["type"],
            }
        )
    return stripped
