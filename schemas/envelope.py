"""The envelope every Calenso delivery shares: ``type``, ``created``, ``source`` and ``data``.

:func:`parse_envelope` runs on every request at the web ingress, so it checks by hand only what is
needed to route the event (a non-empty string ``type`` and an object ``data``) and copies nothing.
Everything inside ``data``, and ``created``, is checked later by :func:`schemas.parse_event`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import EnvelopeError, ErrorDetail

_ABSENT = object()


class Envelope(BaseModel):
    """The outer object of a delivery; ``data`` is the untouched event payload."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: str = Field(min_length=1, description="Event type, e.g. appointment.booking.created.")
    created: str | None = Field(default=None, description="Raw timestamp as sent, zone unknown.")
    source: str | None = Field(default=None, description="Sender, e.g. the dashboard URL.")
    data: dict[str, Any] = Field(description="Event payload, nested or flat.")


def json_type_name(value: object) -> str:
    """Name ``value``'s type the way JSON does (``number``, ``array``, …), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _error(loc: str, msg: str, kind: str) -> ErrorDetail:
    return {"loc": loc, "msg": msg, "type": kind}


def _check_type(value: object) -> ErrorDetail | None:
    if value is _ABSENT:
        return _error("type", "`type` is missing", "missing")
    if not isinstance(value, str):
        return _error(
            "type", f"`type` must be a string, got {json_type_name(value)}", "string_type"
        )
    if not value.strip():
        return _error("type", "`type` must not be empty", "string_too_short")
    return None


def _check_data(value: object) -> ErrorDetail | None:
    if value is _ABSENT:
        return _error("data", "`data` is missing", "missing")
    if not isinstance(value, Mapping):
        return _error("data", f"`data` must be an object, got {json_type_name(value)}", "dict_type")
    return None


def _text(value: object) -> str | None:
    # Kept as text whatever its JSON type, so a strange ``created`` fails later as a PayloadError
    # (the event is kept and inspected) instead of being refused at the door.
    if value is None or isinstance(value, str):
        return value
    return str(value)


def parse_envelope(body: object) -> Envelope:
    """Check that ``body`` (decoded JSON) is a Calenso envelope and return it.

    Raises :class:`EnvelopeError` when ``body`` is not an object, when ``type`` is missing, not a
    string or empty, or when ``data`` is missing or not an object. Unknown top-level keys are
    ignored. ``created`` and ``source`` are kept as raw text.
    """
    event_type, created, source, data = envelope_fields(body)
    # model_construct skips re-validating a body that was just checked; ``data`` can be large.
    return Envelope.model_construct(type=event_type, created=created, source=source, data=data)


def envelope_fields(body: object) -> tuple[str, str | None, str | None, dict[str, Any]]:
    """Check ``body`` as :func:`parse_envelope` does; return ``(type, created, source, data)``.

    For :func:`schemas.parse_event`, which needs the fields but not an :class:`Envelope` (building
    one costs more than the checks).
    """
    # Exact types are tested before the Mapping ABC, whose isinstance is slow: decoded JSON is
    # always a dict, and this runs on every parse.
    if type(body) is not dict and not isinstance(body, Mapping):
        problem = f"the body must be a JSON object, got {json_type_name(body)}"
        raise EnvelopeError(problem, [_error("", problem, "dict_type")])
    event_type = body.get("type", _ABSENT)
    data = body.get("data", _ABSENT)
    if type(event_type) is str and event_type.strip() and type(data) is dict:
        return event_type, _text(body.get("created")), _text(body.get("source")), data
    errors = [e for e in (_check_type(event_type), _check_data(data)) if e is not None]
    if errors:
        raise EnvelopeError("; ".join(e["msg"] for e in errors), errors)
    assert isinstance(event_type, str)
    assert isinstance(data, Mapping)
    return (
        event_type,
        _text(body.get("created")),
        _text(body.get("source")),
        data if isinstance(data, dict) else dict(data),
    )
