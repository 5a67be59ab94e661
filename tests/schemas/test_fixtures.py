"""Every sample payload parses into the right family with the right values, in every shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas import (
    AppointmentEvent,
    CalensoEvent,
    CustomerEvent,
    Family,
    GroupEventEvent,
    LeadEvent,
    PaymentEvent,
    parse_envelope,
    parse_event,
)
from tests.schemas._support import canonical, fixture_names, flatten, load, with_data

LUCA = ("c3a9e5d2-41b7-4f0e-8c2d-6e1f0a9b7d34", "luca.brunner@example.org")
NINA = ("e2d4f6a8-1b3c-4d5e-9f70-8a1b2c3d4e5f", "nina.gerber@example.net")
APPOINTMENT = "0f6b2d4e-8a1c-4e3f-b5d7-2c9a6e8f1b35"
MANUAL_APPOINTMENT = "3d5f7a9b-2c4e-4b6d-8f1a-5c7e9b1d3f60"
GROUP_EVENT = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


@dataclass(frozen=True)
class Expected:
    family: Family
    model: type[CalensoEvent]
    created: datetime
    customer: tuple[str, str] | None
    subject_uuid: str
    start_utc: datetime | None


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


_APPT_CREATED = Expected(
    Family.APPOINTMENT,
    AppointmentEvent,
    _utc(2025, 3, 14, 9, 12, 47),
    LUCA,
    APPOINTMENT,
    _utc(2025, 3, 20, 13, 0),
)
_APPT_CANCELLED = Expected(
    Family.APPOINTMENT,
    AppointmentEvent,
    _utc(2025, 3, 18, 16, 41, 9),
    LUCA,
    APPOINTMENT,
    _utc(2025, 3, 20, 13, 0),
)
_APPT_MANUAL = Expected(
    Family.APPOINTMENT,
    AppointmentEvent,
    _utc(2025, 3, 14, 10, 3, 5),
    LUCA,
    MANUAL_APPOINTMENT,
    _utc(2025, 3, 21, 8, 0),
)
_APPT_UPDATED = Expected(
    Family.APPOINTMENT,
    AppointmentEvent,
    _utc(2025, 3, 17, 7, 55, 31),
    LUCA,
    APPOINTMENT,
    _utc(2025, 3, 27, 14, 30),
)
_EVENT_CREATED = Expected(
    Family.GROUP_EVENT,
    GroupEventEvent,
    _utc(2025, 3, 15, 19, 20, 2),
    NINA,
    GROUP_EVENT,
    _utc(2025, 4, 2, 16, 30),
)
_EVENT_CANCELLED = Expected(
    Family.GROUP_EVENT,
    GroupEventEvent,
    _utc(2025, 3, 30, 12, 14, 58),
    NINA,
    GROUP_EVENT,
    _utc(2025, 4, 2, 16, 30),
)


def _customer(created: datetime) -> Expected:
    return Expected(Family.CUSTOMER, CustomerEvent, created, LUCA, LUCA[0], None)


def _payment(base: Expected, created: datetime) -> Expected:
    return Expected(
        Family.PAYMENT, PaymentEvent, created, base.customer, base.subject_uuid, base.start_utc
    )


EXPECTED: dict[str, Expected] = {
    "appointment.booking.created": _APPT_CREATED,
    "appointment.booking.cancelled": _APPT_CANCELLED,
    "appointment.manual.booking.created": _APPT_MANUAL,
    "appointment.updated": _APPT_UPDATED,
    "event.booking.created": _EVENT_CREATED,
    "event.booking.cancelled": _EVENT_CANCELLED,
    "customer.created": _customer(_utc(2025, 3, 14, 9, 12, 46)),
    "customer.updated": _customer(_utc(2025, 3, 19, 11, 27, 3)),
    "customer.deleted": _customer(_utc(2025, 4, 1, 8, 0, 12)),
    "lead.created": Expected(
        Family.LEAD,
        LeadEvent,
        _utc(2025, 3, 22, 13, 45, 20),
        None,
        "b8c7d6e5-f4a3-4b21-9c0d-1e2f3a4b5c6d",
        None,
    ),
    "appointment.booking.payment_succeeded": _payment(_APPT_CREATED, _utc(2025, 3, 14, 9, 13, 2)),
    "appointment.booking.payment_failed": _payment(_APPT_CREATED, _utc(2025, 3, 14, 9, 13, 2)),
    "event.booking.payment_succeeded": _payment(_EVENT_CREATED, _utc(2025, 3, 15, 19, 20, 40)),
}

ALL = fixture_names()
NESTED = [name for name in ALL if name.endswith(".nested.json")]
PAIRS = [name for name in NESTED if name.replace(".nested.", ".flat.") in ALL]


def _type_of(name: str) -> str:
    return name.rsplit("/", 1)[-1].removesuffix(".json").rsplit(".", 1)[0]


def _subject_uuid(event: CalensoEvent) -> str | None:
    if isinstance(event, AppointmentEvent):
        return event.appointment.uuid
    if isinstance(event, GroupEventEvent):
        return event.event.uuid
    if isinstance(event, CustomerEvent):
        return event.customer.uuid
    if isinstance(event, LeadEvent):
        return event.lead.uuid
    if isinstance(event, PaymentEvent):
        part = event.appointment if event.booking == "appointment" else event.event
        return part.uuid if part is not None else None
    return None


def _start_utc(event: CalensoEvent) -> datetime | None:
    if isinstance(event, AppointmentEvent | PaymentEvent) and event.appointment is not None:
        return event.appointment.start_utc
    if isinstance(event, GroupEventEvent | PaymentEvent) and event.slot is not None:
        return event.slot.start_utc
    return None


def test_every_fixture_has_an_expectation() -> None:
    assert len(ALL) == 24
    assert {_type_of(name) for name in ALL} == set(EXPECTED)


@pytest.mark.parametrize("name", ALL)
def test_fixture_parses_into_its_family(name: str) -> None:
    body = load(name)
    expected = EXPECTED[_type_of(name)]

    event = parse_event(body)

    assert type(event) is expected.model
    assert event.type == body["type"] == _type_of(name)
    assert event.family is expected.family
    assert event.shape == ("nested" if name.endswith(".nested.json") else "flat")
    assert event.created == expected.created
    assert event.created.utcoffset() is not None
    assert event.source == "https://dashboard.calenso.com"
    assert event.raw_data == body["data"]
    assert _subject_uuid(event) == expected.subject_uuid
    if expected.customer is None:
        assert event.customer is None
    else:
        assert event.customer is not None
        assert (event.customer.uuid, event.customer.email) == expected.customer
    start = _start_utc(event)
    assert start == expected.start_utc
    if start is not None:
        assert start.tzinfo is UTC


@pytest.mark.parametrize("name", PAIRS)
def test_nested_and_flat_fixture_give_the_same_canonical_view(name: str) -> None:
    nested = parse_event(load(name))
    flat = parse_event(load(name.replace(".nested.", ".flat.")))

    assert (nested.shape, flat.shape) == ("nested", "flat")
    assert canonical(flat) == canonical(nested)


@pytest.mark.parametrize("name", NESTED)
@pytest.mark.parametrize("sep", [".", "_"])
def test_flattened_nested_fixture_gives_the_same_view(name: str, sep: str) -> None:
    body = load(name)
    flat_body = with_data(body, flatten(body["data"], sep))

    flat = parse_event(flat_body)

    assert flat.shape == "flat"
    assert canonical(flat) == canonical(parse_event(body))


@pytest.mark.parametrize("name", [n for n in NESTED if "appointment." in n])
def test_dotted_services_under_the_appointment_are_found(name: str) -> None:
    body = load(name)
    data = body["data"]
    data["appointment"]["services"] = data.pop("appointment_services")
    dotted = with_data(body, flatten(data, "."))
    assert "appointment.services.0.name" in dotted["data"]

    event = parse_event(dotted)

    assert canonical(event) == canonical(parse_event(load(name)))
    assert [s.name for s in getattr(event, "services")] == ["Erstberatung"]  # noqa: B009


@pytest.mark.parametrize("name", ALL)
def test_compact_and_pretty_json_are_the_same(name: str) -> None:
    body = load(name)
    compact = json.loads(json.dumps(body, separators=(",", ":"), ensure_ascii=False))
    pretty = json.loads(json.dumps(body, indent=7))

    assert canonical(parse_event(compact)) == canonical(parse_event(pretty))


def test_parse_event_accepts_an_envelope_or_a_raw_body() -> None:
    body = load("customer.created.flat.json")
    assert canonical(parse_event(parse_envelope(body))) == canonical(parse_event(body))


def test_appointment_fixture_values_in_detail() -> None:
    event = parse_event(load("appointment.booking.cancelled.flat.json"))

    assert isinstance(event, AppointmentEvent)
    appointment = event.appointment
    assert appointment.id == 4711123
    assert appointment.start_local == datetime(2025, 3, 20, 14, 0)
    assert appointment.start_local.tzinfo is None
    assert appointment.end_local == datetime(2025, 3, 20, 14, 45)
    assert appointment.end_utc == _utc(2025, 3, 20, 13, 45)
    assert appointment.worker_id == 341
    assert appointment.store_id == 57
    assert appointment.parent_id is None
    assert appointment.cancellation_reason == "Ich bin leider krank."
    assert appointment.url == (
        "https://dashboard.calenso.com/appointments/0f6b2d4e-8a1c-4e3f-b5d7-2c9a6e8f1b35"
    )
    assert event.customer is not None
    assert (event.customer.first_name, event.customer.last_name) == ("Luca", "Brunner")
    assert event.customer.phone == "+41790000142"
    assert event.customer.city == "Zürich"
    assert event.user is not None
    assert (event.user.first_name, event.user.bookable, event.user.is_lead_generator) == (
        "Jonas",
        True,
        False,
    )
    assert event.worker is not None
    assert (event.worker.id, event.worker.full_name, event.worker.last_name) == (
        341,
        "Sandro Meier",
        "Meier",
    )
    assert event.store is not None
    assert (event.store.name, event.store.city) == ("Praxis Seefeld", "Zürich")
    assert [(s.id, s.name, s.duration_min, str(s.price)) for s in event.services] == [
        (1204, "Erstberatung", 45, "120.0")
    ]


def test_group_event_fixture_values_in_detail() -> None:
    event = parse_event(load("event.booking.created.flat.json"))

    assert isinstance(event, GroupEventEvent)
    assert event.event.id == 903
    assert event.event.title == "Rückenfit Gruppenkurs"
    assert event.slot is not None
    assert (event.slot.id, event.slot.event_id) == (27710, 903)
    assert event.slot.start_local == datetime(2025, 4, 2, 18, 30)
    assert event.slot.end_utc == _utc(2025, 4, 2, 17, 30)
    assert (event.slot.max_participants, event.slot.participant_count) == (12, 7)
    assert event.user is not None
    assert event.user.uuid == "5b0e2c1a-7d4f-4c2e-9a61-3f8d2b9e4c10"


def test_lead_fixture_values_in_detail() -> None:
    event = parse_event(load("lead.created.nested.json"))

    assert isinstance(event, LeadEvent)
    assert event.customer is None
    assert event.lead.email == "marco.frei@example.com"
    assert (event.lead.first_name, event.lead.last_name) == ("Marco", "Frei")
    assert event.lead.source == "booking_widget"
    assert event.lead.company == "Frei Beispiel AG"


@pytest.mark.parametrize(
    ("name", "succeeded", "booking", "amount", "transaction"),
    [
        (
            "planned/appointment.booking.payment_succeeded.flat.json",
            True,
            "appointment",
            "120.0",
            "pi_TEST_0000000001",
        ),
        (
            "planned/appointment.booking.payment_failed.nested.json",
            False,
            "appointment",
            "120.0",
            "pi_TEST_0000000002",
        ),
        (
            "planned/event.booking.payment_succeeded.flat.json",
            True,
            "event",
            "35.0",
            "pi_TEST_0000000001",
        ),
    ],
)
def test_payment_fixture_values(
    name: str, succeeded: bool, booking: str, amount: str, transaction: str
) -> None:
    event = parse_event(load(name))

    assert isinstance(event, PaymentEvent)
    assert event.succeeded is succeeded
    assert event.booking == booking
    assert event.payment.status == ("succeeded" if succeeded else "failed")
    assert str(event.payment.amount) == amount
    assert event.payment.currency == "CHF"
    assert event.payment.provider == "stripe"
    assert event.payment.transaction_id == transaction
    if booking == "appointment":
        assert event.event is None
        assert event.slot is None
        assert [s.name for s in event.services] == ["Erstberatung"]
    else:
        assert event.appointment is None
        assert event.services == []
        assert event.slot is not None
        assert event.slot.id == 27710


def test_raw_data_is_kept_but_left_out_of_dumps() -> None:
    body = load("customer.created.nested.json")
    event = parse_event(body)

    assert event.raw_data == body["data"]
    assert "raw_data" not in event.model_dump()
    assert "raw_data" not in event.model_dump_json()
    assert "raw_data" not in repr(event)


def _dump_roundtrip(event: CalensoEvent) -> dict[str, Any]:
    again = type(event).model_validate(event.model_dump())
    return canonical(again)


@pytest.mark.parametrize("name", NESTED)
def test_canonical_dump_validates_back_into_the_same_model(name: str) -> None:
    event = parse_event(load(name))
    assert _dump_roundtrip(event) == canonical(event)
