"""Turn an envelope into its family's canonical event model."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, tzinfo
from typing import Any

from pydantic import ValidationError

from schemas._flat_cache import resolve
from schemas._lenient import CREATED_TZ
from schemas.catalogue import KNOWN_TYPES, Family, family_of
from schemas.envelope import Envelope, envelope_fields
from schemas.errors import ErrorDetail, PayloadError, strip_validation_errors, summarise
from schemas.events import MODEL_BY_FAMILY, CalensoEvent, Shape, UnknownEvent

# Family and model of every catalogued type in one lookup (MODEL_BY_FAMILY[family] hashes an
# Enum member, which is a Python-level call).
_KNOWN: dict[str, tuple[Family, type[CalensoEvent]]] = {
    event_type: (family, MODEL_BY_FAMILY[family])
    for event_type in KNOWN_TYPES
    if (family := family_of(event_type)) is not None
}
_UNKNOWN: tuple[None, type[CalensoEvent]] = (None, UnknownEvent)


def detect_shape(data: Mapping[str, Any]) -> Shape:
    """Return ``"nested"`` when some top-level value is an object (or a list of objects).

    Only a label for the parsed event: field lookup tries both shapes whatever this says.
    """
    for value in data.values():
        kind = type(value)
        # Scalars first, by exact type: isinstance against the Mapping ABC is slow, and a flat
        # payload is nothing but scalars.
        if kind is str or value is None or kind is int or kind is float or kind is bool:
            continue
        if kind is dict or isinstance(value, Mapping):
            return "nested"
        if isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
            return "nested"
    return "flat"


def parse_event(
    envelope: Envelope | Mapping[str, Any], *, created_tz: tzinfo = UTC
) -> CalensoEvent:
    """Parse a delivery into the canonical model of its family.

    ``envelope`` is an :class:`Envelope` or the decoded body (then checked as
    :func:`parse_envelope` checks it). A naive ``created`` is read in ``created_tz``; every
    datetime on the result is aware. A type outside the catalogue gives an
    :class:`UnknownEvent`, never an error.

    Raises :class:`EnvelopeError` for envelope problems and :class:`PayloadError` when ``data``
    fails its family's schema or ``created`` is missing or unparseable.
    """
    if not isinstance(created_tz, tzinfo):
        raise TypeError("created_tz must be a tzinfo, e.g. zoneinfo.ZoneInfo('Europe/Zurich')")
    # ``type() is dict`` first: isinstance against a pydantic model class is slow.
    if type(envelope) is not dict and isinstance(envelope, Envelope):
        event_type, created, source, data = (
            envelope.type,
            envelope.created,
            envelope.source,
            envelope.data,
        )
    else:
        event_type, created, source, data = envelope_fields(envelope)
    family, model = _KNOWN.get(event_type, _UNKNOWN)
    fields: dict[str, Any] = {
        "type": event_type,
        "family": family,
        "source": source,
        "shape": detect_shape(data),
        "raw_data": data,
    }
    if created is not None:
        fields["created"] = created
    fields.update(resolve(model, data))
    errors: list[ErrorDetail] | None = None
    try:
        # The validator itself rather than model_validate, which only adds argument checks.
        return model.__pydantic_validator__.validate_python(  # type: ignore[no-any-return]
            fields, context={CREATED_TZ: created_tz}
        )
    except ValidationError as exc:
        errors = strip_validation_errors(exc)
    # Raised outside the except block so the ValidationError, whose text quotes input values,
    # is not attached as __context__ and cannot reach a logged traceback.
    label = family.value if family is not None else "unknown"
    raise PayloadError(f"invalid {label} event: {summarise(errors)}", errors)
