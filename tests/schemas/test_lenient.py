"""Calenso is loose: 0/1 booleans, nulls, numeric strings, extra fields, many timestamp styles."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from schemas import (
    AppointmentEvent,
    CustomerEvent,
    GroupEventEvent,
    PayloadError,
    Staff,
    parse_event,
)
from tests.schemas._support import canonical, load


def _appointment(**data_changes: Any) -> dict[str, Any]:
    body = load("appointment.booking.created.flat.json")
    body["data"].update(data_changes)
    return body


def _parse_appointment(body: dict[str, Any], **kwargs: Any) -> AppointmentEvent:
    event = parse_event(body, **kwargs)
    assert isinstance(event, AppointmentEvent)
    return event


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (1, True),
        (0, False),
        ("1", True),
        ("0", False),
        (True, True),
        (False, False),
        ("true", True),
        ("False", False),
        (1.0, True),
        (None, None),
        ("", None),
    ],
)
def test_booleans(sent: object, expected: bool | None) -> None:
    event = _parse_appointment(_appointment(user_bookable=sent, user_is_reseller_admin=sent))
    assert event.user is not None
    assert event.user.bookable is expected
    assert event.user.is_reseller_admin is expected


@pytest.mark.parametrize("sent", [2, "maybe", [1]])
def test_a_boolean_that_is_not_one_is_a_payload_error(sent: object) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event(_appointment(user_bookable=sent))
    assert [e["loc"] for e in caught.value.errors] == ["user.bookable"]


def test_staff_booleans_validate_directly() -> None:
    staff = Staff.model_validate({"bookable": "1", "is_multi_language": 0})
    assert (staff.bookable, staff.is_multi_language, staff.is_lead_generator) == (True, False, None)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(4711123, 4711123), ("4711123", 4711123), (4711123.0, 4711123), (" 42 ", 42)],
)
def test_ids_as_int_or_numeric_string(sent: object, expected: int) -> None:
    event = _parse_appointment(_appointment(appointment_id=sent, appointment_customer_id=sent))
    assert event.appointment.id == expected
    assert event.customer is not None
    assert event.customer.id == expected


@pytest.mark.parametrize("sent", ["abc", 4.5, True])
def test_an_id_that_is_no_integer_is_a_payload_error(sent: object) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event(_appointment(appointment_worker_id=sent))
    assert caught.value.errors[0]["loc"] == "appointment.worker_id"
    assert caught.value.errors[0]["type"] == "int_parsing"


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (120.0, Decimal("120.0")),
        (120, Decimal(120)),
        ("120.50", Decimal("120.50")),
        (99.95, Decimal("99.95")),
        (None, None),
        ("", None),
    ],
)
def test_prices_as_number_or_string(sent: object, expected: Decimal | None) -> None:
    event = _parse_appointment(_appointment(appointment_services_0_price=sent))
    assert event.services[0].price == expected


def test_nulls_everywhere_optional() -> None:
    body = load("appointment.booking.created.nested.json")
    data = body["data"]
    data["user"] = None
    data["worker"] = None
    data["store"] = None
    data["appointment_services"] = None
    keep = {"uuid"}
    data["appointment"] = {k: (v if k in keep else None) for k, v in data["appointment"].items()}

    event = _parse_appointment(body)

    assert event.user is None
    assert event.worker is None
    assert event.store is None
    assert event.services == []
    assert event.customer is None
    assert event.appointment.uuid == "0f6b2d4e-8a1c-4e3f-b5d7-2c9a6e8f1b35"
    assert event.appointment.start_utc is None
    assert event.appointment.title is None


def test_null_fields_inside_a_present_part_keep_the_part() -> None:
    body = load("appointment.booking.created.nested.json")
    body["data"]["worker"] = dict.fromkeys(body["data"]["worker"])

    event = _parse_appointment(body)

    assert event.worker is not None
    assert event.worker.id is None
    assert event.worker.full_name is None


def test_missing_optional_parts_and_fields() -> None:
    body = load("event.booking.created.nested.json")
    del body["data"]["user"]
    del body["data"]["event"]["category"]
    del body["data"]["event_slot"]
    body["data"]["customer"] = {"uuid": "u-1"}

    event = parse_event(body)

    assert isinstance(event, GroupEventEvent)
    assert event.user is None
    assert event.slot is None
    assert event.event.category is None
    assert event.customer is not None
    assert (event.customer.uuid, event.customer.email) == ("u-1", None)


def test_unknown_fields_never_break_parsing() -> None:
    body = load("appointment.booking.created.nested.json")
    body["data"]["appointment"]["video_meeting"] = {"provider": "zoom", "links": [1, 2]}
    body["data"]["appointment"]["customer"]["loyalty_points"] = 42
    body["data"]["brand_new_object"] = {"id": "x"}
    body["data"]["appointment_services"][0]["tax_rate"] = "7.7"
    body["data"]["appointment_services"][0]["extras"] = [{"a": None}]

    event = parse_event(body)

    assert canonical(event) == canonical(
        parse_event(load("appointment.booking.created.nested.json"))
    )


def test_unknown_flat_fields_never_break_parsing() -> None:
    plain = parse_event(_appointment())
    extended = parse_event(
        _appointment(appointment_meeting_url="https://x.test", customer_favourite=[1], zzz=None)
    )
    assert canonical(extended) == canonical(plain)


def test_phone_is_kept_as_given_and_empty_is_none() -> None:
    event = _parse_appointment(_appointment(appointment_customer_phone="079 000 01 42"))
    assert event.customer is not None
    assert event.customer.phone == "079 000 01 42"

    event = _parse_appointment(_appointment(appointment_customer_phone=""))
    assert event.customer is not None
    assert event.customer.phone is None


def test_zip_as_a_number_becomes_text() -> None:
    event = _parse_appointment(_appointment(appointment_customer_zip=8008, store_zip=8008))
    assert event.customer is not None
    assert event.store is not None
    assert (event.customer.zip, event.store.zip) == ("8008", "8008")


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("1990-05-17", date(1990, 5, 17)),
        ("1990-05-17 00:00:00", date(1990, 5, 17)),
        ("1990-05-17T00:00:00Z", date(1990, 5, 17)),
        ("17.05.1990", date(1990, 5, 17)),
        ("0000-00-00", None),
        ("", None),
        (None, None),
    ],
)
def test_birthday_is_a_date(sent: object, expected: date | None) -> None:
    body = load("customer.created.flat.json")
    body["data"]["customer_birthday"] = sent
    event = parse_event(body)
    assert isinstance(event, CustomerEvent)
    assert event.customer.birthday == expected


def test_unparseable_birthday_is_a_payload_error() -> None:
    body = load("customer.created.flat.json")
    body["data"]["customer_birthday"] = "im Mai"
    with pytest.raises(PayloadError) as caught:
        parse_event(body)
    assert caught.value.errors == [
        {
            "loc": "customer.birthday",
            "msg": "Input should be a date like 1990-05-17",
            "type": "date_parsing",
        }
    ]


START_UTC = datetime(2025, 3, 20, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("2025-03-20 13:00:00", START_UTC),
        ("2025-03-20T13:00:00", START_UTC),
        ("2025-03-20T13:00:00Z", START_UTC),
        ("2025-03-20T14:00:00+01:00", START_UTC),
        ("2025-03-20T14:00:00+0100", START_UTC),
        ("2025-03-20T08:00:00-05:00", START_UTC),
        ("2025-03-20T13:00:00.250Z", START_UTC + timedelta(milliseconds=250)),
        ("2025-03-20 13:00:00.123456", START_UTC + timedelta(microseconds=123456)),
        ("2025-03-20T13:00Z", START_UTC),
    ],
)
def test_utc_timestamp_formats(sent: str, expected: datetime) -> None:
    event = _parse_appointment(_appointment(appointment_start_utc=sent))
    start = event.appointment.start_utc
    assert start == expected
    assert start is not None
    assert start.tzinfo is UTC


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("2025-03-20 14:00:00", datetime(2025, 3, 20, 14, 0)),
        ("2025-03-20T14:00:00", datetime(2025, 3, 20, 14, 0)),
        # The wall-clock time is what matters for a local field; a sent offset is dropped.
        ("2025-03-20T14:00:00+01:00", datetime(2025, 3, 20, 14, 0)),
        ("2025-03-20T14:00:00.5", datetime(2025, 3, 20, 14, 0, 0, 500000)),
    ],
)
def test_local_start_stays_naive(sent: str, expected: datetime) -> None:
    event = _parse_appointment(_appointment(appointment_start=sent))
    assert event.appointment.start_local == expected
    assert event.appointment.start_local is not None
    assert event.appointment.start_local.tzinfo is None


@pytest.mark.parametrize(
    "sent", ["2025-03-20", "20.03.2025 14:00", "morgen", "2025-13-01 10:00:00", 1742475600]
)
def test_bad_timestamp_is_a_payload_error(sent: object) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event(_appointment(appointment_start_utc=sent))
    assert [e["loc"] for e in caught.value.errors] == ["appointment.start_utc"]


def test_zero_date_timestamp_is_none() -> None:
    event = _parse_appointment(_appointment(appointment_end_utc="0000-00-00 00:00:00"))
    assert event.appointment.end_utc is None


@pytest.mark.parametrize(
    "created",
    [
        "2025-03-14 09:12:47",
        "2025-03-14T09:12:47",
        "2025-03-14T09:12:47Z",
        "2025-03-14T10:12:47+01:00",
        "2025-03-14T09:12:47.000Z",
        "2025-03-14 09:12:47.000000",
    ],
)
def test_created_formats(created: str) -> None:
    body = _appointment()
    body["created"] = created
    event = parse_event(body)
    assert event.created == datetime(2025, 3, 14, 9, 12, 47, tzinfo=UTC)
    assert event.created.tzinfo is UTC


def test_naive_created_is_read_in_the_given_zone() -> None:
    body = _appointment()
    body["created"] = "2025-03-14 09:12:47"

    zurich = parse_event(body, created_tz=ZoneInfo("Europe/Zurich"))
    summer = dict(body, created="2025-07-14 09:12:47")
    zurich_summer = parse_event(summer, created_tz=ZoneInfo("Europe/Zurich"))
    default = parse_event(body)

    assert zurich.created == datetime(2025, 3, 14, 8, 12, 47, tzinfo=UTC)
    assert zurich_summer.created == datetime(2025, 7, 14, 7, 12, 47, tzinfo=UTC)
    assert default.created == datetime(2025, 3, 14, 9, 12, 47, tzinfo=UTC)


def test_created_with_an_offset_ignores_the_given_zone() -> None:
    body = _appointment()
    body["created"] = "2025-03-14T09:12:47+00:00"
    event = parse_event(body, created_tz=timezone(timedelta(hours=5)))
    assert event.created == datetime(2025, 3, 14, 9, 12, 47, tzinfo=UTC)


def test_created_tz_does_not_touch_utc_fields() -> None:
    event = _parse_appointment(_appointment(), created_tz=ZoneInfo("Europe/Zurich"))
    assert event.appointment.start_utc == START_UTC


def test_created_tz_must_be_a_tzinfo() -> None:
    with pytest.raises(TypeError, match="tzinfo"):
        parse_event(_appointment(), created_tz="Europe/Zurich")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("created", "zone"),
    [("0001-01-01 00:00:00", "Europe/Zurich"), ("9999-12-31 23:59:59", "America/New_York")],
)
def test_a_created_out_of_range_in_utc_is_a_payload_error(created: str, zone: str) -> None:
    """Found by the schema review: year 1 east of UTC (or 9999 west of it) cannot be expressed
    in UTC; an OverflowError escaped parse_event instead of a PayloadError."""
    body = {"type": "customer.created", "created": created, "data": {"customer": {"uuid": "c"}}}
    with pytest.raises(PayloadError):
        parse_event(body, created_tz=ZoneInfo(zone))


def test_a_utc_field_out_of_range_is_a_payload_error() -> None:
    body = {
        "type": "appointment.booking.created",
        "created": "2025-05-01 10:00:00",
        "data": {"appointment": {"uuid": "a", "start_utc": "0001-01-01T00:00:00+01:00"}},
    }
    with pytest.raises(PayloadError):
        parse_event(body)
