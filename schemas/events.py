"""Canonical event models, one per family, plus :class:`UnknownEvent` for uncatalogued types.

Every event has the envelope fields (``type``, ``family``, ``created``, ``source``, ``shape``),
the untouched payload in ``raw_data`` (left out of dumps) and a ``customer`` (``None`` where the
family has none), so a handler can always write ``event.customer``.

Identifiers each family needs, checked after parsing (a missing one is a ``PayloadError``):

- appointment: ``appointment.uuid``.
- group event: ``event.uuid`` *or* ``slot.id``; a participant books a slot, and the slot id alone
  is enough to find the booking, so either identifies it (the error names ``event.uuid``).
- customer: ``customer.uuid``.
- lead: ``lead.uuid`` *or* ``lead.email``.
- payment: as the booking it is for (``booking`` is taken from the type's first word).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from schemas._flat import keys
from schemas._lenient import CreatedDatetime, OptStr
from schemas.catalogue import Family
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

Shape = Literal["nested", "flat"]
Booking = Literal["appointment", "event"]
# (part, field) pairs; an event is identified when any one of them is non-empty.
Identifiers = tuple[tuple[str, str], ...]

_APPOINTMENT_ID: Identifiers = (("appointment", "uuid"),)
_GROUP_EVENT_ID: Identifiers = (("event", "uuid"), ("slot", "id"))

_CUSTOMER = keys("customer")
# Appointment payloads carry the customer inside the appointment (confirmed by real traffic).
_APPOINTMENT_CUSTOMER = keys(("appointment", "customer"), "customer")
_SERVICES = keys("appointment_services", ("appointment", "services"), "services")
_SLOT = keys("event_slot", ("event", "slot"), "slot")


class CalensoEvent(BaseModel):
    """Base of every parsed event: the envelope, the raw payload and ``customer``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    data_fields: ClassVar[tuple[str, ...]] = ()
    """Fields looked up in ``data``; the others come from the envelope."""
    identifiers: ClassVar[Identifiers] = ()

    type: str = Field(min_length=1)
    family: Family | None = None
    created: CreatedDatetime
    source: OptStr = None
    shape: Shape
    raw_data: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    customer: Customer | None = None

    def _required_identifiers(self) -> Identifiers:
        return self.identifiers

    @model_validator(mode="after")
    def _check_identified(self) -> Self:
        required = self._required_identifiers()
        # A plain loop rather than any() over a generator of method calls: this runs on every
        # parse. An identifier counts when it is neither None nor "".
        for part, field in required:
            value = getattr(getattr(self, part, None), field, None)
            if value is not None and value != "":
                return self
        if not required:
            return self
        part, field = required[0]
        alternatives = ", ".join(f"{p}.{f}" for p, f in required[1:])
        message = f"Field required (or {alternatives})" if alternatives else "Field required"
        detail = InitErrorDetails(
            type=PydanticCustomError("missing", message), loc=(part, field), input=None
        )
        # A ValidationError raised here keeps the (part, field) location, which a plain
        # ValueError would lose; pydantic merges it into the caller's error.
        raise ValidationError.from_exception_data(type(self).__name__, [detail])


class AppointmentEvent(CalensoEvent):
    """``appointment.*``: a one-to-one appointment was booked, rescheduled or cancelled."""

    data_fields: ClassVar[tuple[str, ...]] = (
        "appointment",
        "customer",
        "user",
        "worker",
        "store",
        "services",
    )
    identifiers: ClassVar[Identifiers] = _APPOINTMENT_ID

    appointment: Appointment
    customer: Annotated[Customer | None, _APPOINTMENT_CUSTOMER] = None
    user: Staff | None = None
    worker: Worker | None = None
    store: Store | None = None
    services: Annotated[list[Service], _SERVICES] = Field(default_factory=list)


class GroupEventEvent(CalensoEvent):
    """``event.*``: a participant booked or cancelled a slot of a group event.

    ``event`` is empty (all fields ``None``) when the payload names only the slot.
    """

    data_fields: ClassVar[tuple[str, ...]] = ("event", "slot", "customer", "user")
    identifiers: ClassVar[Identifiers] = _GROUP_EVENT_ID

    event: GroupEvent = Field(default_factory=GroupEvent)
    slot: Annotated[EventSlot | None, _SLOT] = None
    customer: Annotated[Customer | None, _CUSTOMER] = None
    user: Staff | None = None


class CustomerEvent(CalensoEvent):
    """``customer.*``: a customer record was created, updated or deleted."""

    data_fields: ClassVar[tuple[str, ...]] = ("customer",)
    identifiers: ClassVar[Identifiers] = (("customer", "uuid"),)

    customer: Annotated[Customer, _CUSTOMER]


class LeadEvent(CalensoEvent):
    """``lead.created``: a lead form was submitted. ``customer`` is always ``None``."""

    data_fields: ClassVar[tuple[str, ...]] = ("lead",)
    identifiers: ClassVar[Identifiers] = (("lead", "uuid"), ("lead", "email"))

    lead: Lead


class PaymentEvent(CalensoEvent):
    """``*.booking.payment_*``: a payment for an appointment or a group-event booking.

    Carries whatever parts of the booking the payload has; ``payment`` is empty (all ``None``)
    when the payload has no payment object, and :attr:`succeeded` is read from the type.
    """

    data_fields: ClassVar[tuple[str, ...]] = (
        "payment",
        "appointment",
        "event",
        "slot",
        "customer",
        "user",
        "worker",
        "store",
        "services",
    )

    booking: Booking
    payment: Payment = Field(default_factory=Payment)
    appointment: Appointment | None = None
    event: GroupEvent | None = None
    slot: Annotated[EventSlot | None, _SLOT] = None
    customer: Annotated[Customer | None, _APPOINTMENT_CUSTOMER] = None
    user: Staff | None = None
    worker: Worker | None = None
    store: Store | None = None
    services: Annotated[list[Service], _SERVICES] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _booking_from_type(cls, value: Any) -> Any:
        if isinstance(value, dict) and "booking" not in value:
            event_type = value.get("type")
            if isinstance(event_type, str) and event_type.startswith(("appointment.", "event.")):
                return {**value, "booking": event_type.partition(".")[0]}
        return value

    def _required_identifiers(self) -> Identifiers:
        return _APPOINTMENT_ID if self.booking == "appointment" else _GROUP_EVENT_ID

    @property
    def succeeded(self) -> bool:
        """Whether the type reports a successful payment (``…payment_succeeded``)."""
        return self.type.endswith("payment_succeeded")


class UnknownEvent(CalensoEvent):
    """An event type not in the catalogue: only the envelope fields and ``raw_data``."""


EVENT_MODELS: tuple[type[CalensoEvent], ...] = (
    AppointmentEvent,
    GroupEventEvent,
    CustomerEvent,
    LeadEvent,
    PaymentEvent,
    UnknownEvent,
)
"""Every concrete event model, in catalogue order."""

MODEL_BY_FAMILY: dict[Family, type[CalensoEvent]] = {
    Family.APPOINTMENT: AppointmentEvent,
    Family.GROUP_EVENT: GroupEventEvent,
    Family.CUSTOMER: CustomerEvent,
    Family.LEAD: LeadEvent,
    Family.PAYMENT: PaymentEvent,
}
