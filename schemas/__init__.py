"""Typed views of Calenso webhook deliveries: envelope, event catalogue and canonical models.

Pure values: nothing here does I/O or reads the environment. The web ingress calls
:func:`parse_envelope` on every request; workers call :func:`parse_event` and hand the resulting
:class:`CalensoEvent` subclass to a handler of its :class:`Family`.
"""

from schemas.catalogue import CURRENT_TYPES, KNOWN_TYPES, PLANNED_TYPES, Family, family_of
from schemas.envelope import Envelope, parse_envelope
from schemas.errors import EnvelopeError, PayloadError, SchemaError
from schemas.events import (
    AppointmentEvent,
    CalensoEvent,
    CustomerEvent,
    GroupEventEvent,
    LeadEvent,
    PaymentEvent,
    UnknownEvent,
)
from schemas.json_schema import event_json_schema
from schemas.parse import parse_event
from schemas.parts import (
    Appointment,
    Customer,
    EventSlot,
    GroupEvent,
    Lead,
    Payment,
    Service,
    Staff,
    Store,
    Worker,
)

__all__ = [
    "CURRENT_TYPES",
    "KNOWN_TYPES",
    "PLANNED_TYPES",
    "Appointment",
    "AppointmentEvent",
    "CalensoEvent",
    "Customer",
    "CustomerEvent",
    "Envelope",
    "EnvelopeError",
    "EventSlot",
    "Family",
    "GroupEvent",
    "GroupEventEvent",
    "Lead",
    "LeadEvent",
    "PayloadError",
    "Payment",
    "PaymentEvent",
    "SchemaError",
    "Service",
    "Staff",
    "Store",
    "UnknownEvent",
    "Worker",
    "event_json_schema",
    "family_of",
    "parse_envelope",
    "parse_event",
]
