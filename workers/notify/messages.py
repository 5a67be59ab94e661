"""What a notice says and whom it goes to, read from a canonical event.

A :class:`Notice` is the same for e-mail and chat: its kind (which template), its language and
the values of the template placeholders (:data:`FIELDS`), every one a single line of text.
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo

from calhook.privacy import mask_email
from calhook.settings import Settings
from schemas import (
    Appointment,
    AppointmentEvent,
    CalensoEvent,
    EventSlot,
    GroupEvent,
    GroupEventEvent,
    PaymentEvent,
    Service,
    Staff,
    Store,
    Worker,
)
from workers.errors import PermanentError
from workers.notify._format import (
    Language,
    format_amount,
    format_datetime,
    format_time,
    store_time,
)

log = logging.getLogger("calhook.notify")

LANGUAGES: tuple[Language, ...] = ("de", "en")
DASH = "\u2013"
MISSING = DASH
"""What a placeholder shows when the payload has no value for it."""


class Kind(StrEnum):
    """Which notice an event gives; also the template's file name."""

    CANCELLED = "cancelled"
    MOVED = "moved"
    PAYMENT_FAILED = "payment_failed"


KIND_BY_TYPE: Mapping[str, Kind] = {
    "appointment.booking.cancelled": Kind.CANCELLED,
    "event.booking.cancelled": Kind.CANCELLED,
    "appointment.updated": Kind.MOVED,
    "appointment.booking.payment_failed": Kind.PAYMENT_FAILED,
    "event.booking.payment_failed": Kind.PAYMENT_FAILED,
}
NOTIFY_TYPES: tuple[str, ...] = tuple(sorted(KIND_BY_TYPE))
"""The event types that give a notice."""

FIELDS: tuple[str, ...] = (
    "customer",  # first and last name of the customer
    "service",  # booked services (appointments) or the group event's title
    "store",  # store name (appointments) or the group event's location
    "start",  # start in the store's zone, formatted for the language
    "end_time",  # end time of day, 14:45
    "when",  # start and end, 20.03.2025 14:00 to 14:45 with an en dash; the start alone if no end
    "staff",  # the worker/resource (appointments) or the Calenso user
    "reason",  # cancellation reason
    "amount",  # payment amount and currency, 120.00 CHF
    "reference",  # appointment uuid, or group event uuid and slot id
    "link",  # Calenso dashboard link of the appointment
    "event_type",  # the webhook type, appointment.updated
)
"""Every placeholder a template may use."""

NotifyEvent = AppointmentEvent | GroupEventEvent | PaymentEvent


@dataclass(frozen=True, slots=True)
class Notice:
    """One notice, ready to render: kind, language, placeholder values, staff address."""

    kind: Kind
    language: Language
    fields: Mapping[str, str]
    staff_email: str | None


@dataclass(frozen=True, slots=True)
class _Booking:
    """The parts of an appointment or a group-event booking that a notice shows."""

    start_utc: datetime | None
    start_local: datetime | None
    end_utc: datetime | None
    end_local: datetime | None
    service: str | None
    store: str | None
    staff: str | None
    staff_email: str | None
    reason: str | None
    reference: str | None
    link: str | None


def build_notice(event: CalensoEvent, settings: Settings) -> Notice:
    """The notice of ``event``; PermanentError for a type that gives none."""
    kind = KIND_BY_TYPE.get(event.type)
    if kind is None or not isinstance(event, NotifyEvent):
        raise PermanentError(f"notify has no notice for event type {event.type!r}")
    booking = _booking(event)
    language = choose_language(event, settings.notify_language)
    zone = ZoneInfo(settings.store_tz)
    start = store_time(booking.start_utc, booking.start_local, zone)
    end = store_time(booking.end_utc, booking.end_local, zone)
    amount = None
    if isinstance(event, PaymentEvent):
        amount = format_amount(event.payment.amount, event.payment.currency)
    customer = event.customer
    values = {
        "customer": _name(customer.first_name, customer.last_name) if customer else None,
        "service": booking.service,
        "store": booking.store,
        "start": format_datetime(start, language) if start else None,
        "end_time": format_time(end) if end else None,
        "when": _when(start, end, language),
        "staff": booking.staff,
        "reason": booking.reason,
        "amount": amount,
        "reference": booking.reference,
        "link": booking.link,
        "event_type": event.type,
    }
    return Notice(kind, language, {k: _one_line(v) for k, v in values.items()}, booking.staff_email)


def choose_language(event: NotifyEvent, default: Language) -> Language:
    """The staff member's language if we have it, else the customer's, else ``default``."""
    candidates = (
        event.user.language if event.user else None,
        event.customer.language if event.customer else None,
    )
    for candidate in candidates:
        # Calenso sends "de", "en", sometimes "de_CH" or "en-GB".
        code = (candidate or "").strip().lower().replace("_", "-").split("-")[0]
        for language in LANGUAGES:
            if code == language:
                return language
    return default


def recipients(notice: Notice, settings: Settings) -> tuple[str, ...]:
    """The staff member (when CALHOOK_NOTIFY_STAFF) and CALHOOK_NOTIFY_TO, deduplicated.

    Addresses compare case-insensitively; the first spelling wins. An unusable address is
    logged (masked) and left out.
    """
    candidates = [notice.staff_email] if settings.notify_staff and notice.staff_email else []
    candidates.extend(settings.notify_to)
    seen: set[str] = set()
    chosen: list[str] = []
    for candidate in candidates:
        address = _address(candidate)
        if address is None:
            log.warning("unusable recipient left out", extra={"recipient": mask_email(candidate)})
            continue
        if address.lower() not in seen:
            seen.add(address.lower())
            chosen.append(address)
    return tuple(chosen)


def _address(value: str) -> str | None:
    _, address = email.utils.parseaddr(value)
    # A CR or LF would let a payload value add headers to the message.
    if "@" not in address or any(c.isspace() for c in address):
        return None
    return address


def _booking(event: NotifyEvent) -> _Booking:
    if isinstance(event, AppointmentEvent):
        return _appointment(
            event.appointment, event.worker, event.user, event.store, event.services
        )
    if isinstance(event, GroupEventEvent):
        return _group_event(event.event, event.slot, event.user)
    if event.booking == "appointment":
        return _appointment(
            event.appointment, event.worker, event.user, event.store, event.services
        )
    return _group_event(event.event, event.slot, event.user)


def _appointment(
    appointment: Appointment | None,
    worker: Worker | None,
    user: Staff | None,
    store: Store | None,
    services: list[Service],
) -> _Booking:
    appointment = appointment or Appointment()
    worker_name = (
        (worker.full_name or _name(worker.first_name, worker.last_name)) if worker else None
    )
    return _Booking(
        start_utc=appointment.start_utc,
        start_local=appointment.start_local,
        end_utc=appointment.end_utc,
        end_local=appointment.end_local,
        service=", ".join(s.name for s in services if s.name) or appointment.title,
        store=store.name if store else None,
        staff=worker_name or _staff_name(user),
        # The resource the customer booked is the person concerned; the account owner is
        # only the fallback (a room has no address).
        staff_email=(worker.email if worker else None) or (user.email if user else None),
        reason=appointment.cancellation_reason,
        reference=appointment.uuid or (str(appointment.id) if appointment.id else None),
        link=appointment.url,
    )


def _group_event(group: GroupEvent | None, slot: EventSlot | None, user: Staff | None) -> _Booking:
    group = group or GroupEvent()
    slot = slot or EventSlot()
    parts = [group.uuid, f"slot {slot.id}" if slot.id is not None else None]
    return _Booking(
        start_utc=slot.start_utc,
        start_local=slot.start_local,
        end_utc=slot.end_utc,
        end_local=slot.end_local,
        service=group.title or group.category,
        store=group.location,
        staff=_staff_name(user),
        staff_email=user.email if user else None,
        reason=None,
        reference=" / ".join(p for p in parts if p) or None,
        link=None,
    )


def _when(start: datetime | None, end: datetime | None, language: Language) -> str | None:
    if start is None:
        return None
    if end is None or end.date() != start.date():
        return format_datetime(start, language)
    return f"{format_datetime(start, language)}{DASH}{format_time(end)}"


def _staff_name(user: Staff | None) -> str | None:
    return _name(user.first_name, user.last_name) if user else None


def _name(first: str | None, last: str | None) -> str | None:
    return " ".join(part for part in (first, last) if part) or None


def _one_line(value: str | None) -> str:
    # Values go into a Subject header and one-line layouts; a newline there breaks both.
    text = " ".join((value or "").split())
    return text or MISSING
