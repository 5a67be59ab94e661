"""The catalogue of Calenso event types and the family each one belongs to."""

from __future__ import annotations

from enum import StrEnum


class Family(StrEnum):
    """A group of event types that share one payload schema and one canonical model."""

    APPOINTMENT = "appointment"
    GROUP_EVENT = "group_event"
    CUSTOMER = "customer"
    LEAD = "lead"
    PAYMENT = "payment"


# One entry per type; the family decides which canonical model parses the payload.
_CURRENT: dict[str, Family] = {
    "appointment.booking.created": Family.APPOINTMENT,
    "appointment.manual.booking.created": Family.APPOINTMENT,
    "appointment.booking.cancelled": Family.APPOINTMENT,
    "appointment.updated": Family.APPOINTMENT,
    "event.booking.created": Family.GROUP_EVENT,
    "event.manual.booking.created": Family.GROUP_EVENT,
    "event.booking.cancelled": Family.GROUP_EVENT,
    "customer.created": Family.CUSTOMER,
    "customer.updated": Family.CUSTOMER,
    "customer.deleted": Family.CUSTOMER,
    "lead.created": Family.LEAD,
}

# Announced by Calenso but not yet sent; payloads are our best guess (see CALENSO.md).
_PLANNED: dict[str, Family] = {
    "appointment.booking.payment_succeeded": Family.PAYMENT,
    "appointment.booking.payment_failed": Family.PAYMENT,
    "event.booking.payment_succeeded": Family.PAYMENT,
    "event.booking.payment_failed": Family.PAYMENT,
}

_FAMILIES: dict[str, Family] = {**_CURRENT, **_PLANNED}

CURRENT_TYPES: frozenset[str] = frozenset(_CURRENT)
"""Event types Calenso sends today."""

PLANNED_TYPES: frozenset[str] = frozenset(_PLANNED)
"""Event types Calenso has announced (payments); they may start arriving any day."""

KNOWN_TYPES: frozenset[str] = CURRENT_TYPES | PLANNED_TYPES
"""Every event type this package has a canonical model for."""


def family_of(event_type: str) -> Family | None:
    """Return the family of ``event_type``, or ``None`` for a type not in the catalogue."""
    return _FAMILIES.get(event_type)
