"""The candidate-key lookup behind flat payloads: conventions, lists and tie-breaks."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import AppointmentEvent, GroupEventEvent, parse_event
from schemas.parse import detect_shape

CREATED = "2025-03-14 09:12:47"


def _appointment_event(data: dict[str, Any]) -> AppointmentEvent:
    event = parse_event({"type": "appointment.booking.created", "created": CREATED, "data": data})
    assert isinstance(event, AppointmentEvent)
    return event


@pytest.mark.parametrize(
    "data",
    [
        {"appointment_uuid": "a-1", "appointment_customer_email": "c@example.com"},
        {"appointment.uuid": "a-1", "appointment.customer.email": "c@example.com"},
        {"appointment": {"uuid": "a-1", "customer": {"email": "c@example.com"}}},
        {"appointment": {"uuid": "a-1", "customer_email": "c@example.com"}},
        {"appointment": {"uuid": "a-1"}, "appointment.customer.email": "c@example.com"},
        {"appointment_uuid": "a-1", "customer_email": "c@example.com"},
        {"appointment_uuid": "a-1", "customer": {"email": "c@example.com"}},
    ],
)
def test_every_convention_finds_the_same_fields(data: dict[str, Any]) -> None:
    event = _appointment_event(data)
    assert event.appointment.uuid == "a-1"
    assert event.customer is not None
    assert event.customer.email == "c@example.com"


@pytest.mark.parametrize(
    "keys",
    [
        ("appointment_services_{i}_name", "appointment_services_{i}_price"),
        ("appointment_services.{i}.name", "appointment_services.{i}.price"),
        ("appointment.services.{i}.name", "appointment.services.{i}.price"),
        ("services.{i}.name", "services_{i}_price"),
    ],
)
def test_flat_lists_are_probed_until_an_index_is_missing(keys: tuple[str, str]) -> None:
    name_key, price_key = keys
    data: dict[str, Any] = {"appointment_uuid": "a-1"}
    for i, (name, price) in enumerate([("Cut", "40"), ("Wash", 12.5), ("Dry", None)]):
        data[name_key.format(i=i)] = name
        data[price_key.format(i=i)] = price
    data[name_key.format(i=4)] = "after a gap: not reached"

    event = _appointment_event(data)

    assert [(s.name, None if s.price is None else str(s.price)) for s in event.services] == [
        ("Cut", "40"),
        ("Wash", "12.5"),
        ("Dry", None),
    ]


def test_nested_list_sent_as_a_php_object_with_index_keys() -> None:
    data = {
        "appointment": {"uuid": "a-1"},
        "appointment_services": {"0": {"name": "Cut"}, "1": {"name": "Wash"}},
    }
    assert [s.name for s in _appointment_event(data).services] == ["Cut", "Wash"]


def test_customer_inside_the_appointment_wins_over_a_top_level_customer() -> None:
    data = {
        "appointment_uuid": "a-1",
        "appointment_customer_uuid": "inner",
        "customer_uuid": "outer",
        "customer_email": "outer@example.com",
    }
    customer = _appointment_event(data).customer
    assert customer is not None
    # The object is read from one place only: no e-mail stitched in from the other customer.
    assert (customer.uuid, customer.email) == ("inner", None)


def test_first_non_empty_alias_wins() -> None:
    data = {
        "appointment_uuid": "a-1",
        "worker_full_name": None,
        "worker_resource_name": "Raum 2",
        "store_place": "",
        "store_city": "Zürich",
    }
    event = _appointment_event(data)
    assert event.worker is not None
    assert event.store is not None
    assert event.worker.full_name == "Raum 2"
    assert event.store.city == "Zürich"


def test_nested_value_wins_over_a_joined_key() -> None:
    data = {"appointment": {"uuid": "nested"}, "appointment_uuid": "joined"}
    assert _appointment_event(data).appointment.uuid == "nested"


def test_dot_joined_key_wins_over_underscore_joined_key() -> None:
    data = {"appointment.uuid": "dotted", "appointment_uuid": "underscored"}
    assert _appointment_event(data).appointment.uuid == "dotted"


def test_event_slot_keys_do_not_leak_into_the_event() -> None:
    data = {
        "event_id": 903,
        "event_uuid": "e-1",
        "event_slot_id": 27710,
        "event_slot_event_id": 903,
        "event_slot_start_utc": "2025-04-02 16:30:00",
    }
    event = parse_event({"type": "event.booking.created", "created": CREATED, "data": data})
    assert isinstance(event, GroupEventEvent)
    assert (event.event.id, event.event.uuid) == (903, "e-1")
    assert event.slot is not None
    assert (event.slot.id, event.slot.event_id) == (27710, 903)
    assert event.customer is None


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        ({"customer": {"uuid": "u"}}, "nested"),
        ({"appointment_services": [{"id": 1}], "appointment_uuid": "a"}, "nested"),
        ({"customer_uuid": "u", "appointment_child_appointments": []}, "flat"),
        ({"customer.uuid": "u"}, "flat"),
        ({}, "flat"),
    ],
)
def test_detect_shape(data: dict[str, Any], shape: str) -> None:
    assert detect_shape(data) == shape
