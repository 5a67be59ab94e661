"""PayloadError: which payloads fail their family, and that no personal data leaks into errors."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import pytest

from schemas import (
    GroupEventEvent,
    LeadEvent,
    PayloadError,
    SchemaError,
    UnknownEvent,
    parse_event,
)
from tests.schemas._support import load

EMAIL = "luca.brunner@example.org"


def _customer_without_uuid() -> dict[str, Any]:
    body = load("customer.created.flat.json")
    del body["data"]["customer_uuid"]
    return body


def _assert_no_personal_data(err: SchemaError, *secrets: str) -> None:
    texts = [
        str(err),
        repr(err),
        err.message,
        repr(err.errors),
        "".join(traceback.format_exception(err)),
    ]
    for secret in secrets:
        for text in texts:
            assert secret not in text
    for error in err.errors:
        assert set(error) == {"loc", "msg", "type"}


def _raise(body: dict[str, Any]) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        parse_event(body)
    return caught.value


def test_customer_event_without_uuid() -> None:
    err = _raise(_customer_without_uuid())

    assert err.errors == [{"loc": "customer.uuid", "msg": "Field required", "type": "missing"}]
    assert str(err) == "invalid customer event: customer.uuid: Field required"
    _assert_no_personal_data(err, EMAIL, "Brunner", "+41790000142")


@pytest.mark.parametrize("uuid", [None, "", "   "])
def test_customer_event_with_empty_uuid(uuid: object) -> None:
    body = load("customer.updated.nested.json")
    body["data"]["customer"]["uuid"] = uuid
    assert _raise(body).errors[0]["loc"] == "customer.uuid"


def test_customer_event_without_customer() -> None:
    body = load("customer.created.nested.json")
    body["data"] = {"person": body["data"]["customer"]}
    err = _raise(body)
    assert err.errors == [{"loc": "customer", "msg": "Field required", "type": "missing"}]
    _assert_no_personal_data(err, EMAIL)


def test_appointment_event_without_appointment_uuid() -> None:
    body = load("appointment.booking.created.nested.json")
    del body["data"]["appointment"]["uuid"]
    err = _raise(body)
    assert err.errors == [{"loc": "appointment.uuid", "msg": "Field required", "type": "missing"}]


def test_appointment_event_without_appointment() -> None:
    body = load("appointment.updated.flat.json")
    body["data"] = {k: v for k, v in body["data"].items() if not k.startswith("appointment_")}
    assert _raise(body).errors[0]["loc"] == "appointment"


def test_group_event_is_identified_by_event_uuid_or_slot_id() -> None:
    only_slot = load("event.booking.created.flat.json")
    del only_slot["data"]["event_uuid"]
    event = parse_event(only_slot)
    assert isinstance(event, GroupEventEvent)
    assert event.event.uuid is None
    assert event.slot is not None
    assert event.slot.id == 27710

    only_event = load("event.booking.created.nested.json")
    del only_event["data"]["event_slot"]
    event = parse_event(only_event)
    assert isinstance(event, GroupEventEvent)
    assert event.slot is None

    neither = load("event.booking.cancelled.nested.json")
    del neither["data"]["event"]
    del neither["data"]["event_slot"]["id"]
    err = _raise(neither)
    assert err.errors == [
        {"loc": "event.uuid", "msg": "Field required (or slot.id)", "type": "missing"}
    ]


def test_lead_is_identified_by_uuid_or_email() -> None:
    body = load("lead.created.nested.json")
    del body["data"]["lead"]["uuid"]
    event = parse_event(body)
    assert isinstance(event, LeadEvent)
    assert event.lead.email == "marco.frei@example.com"

    del body["data"]["lead"]["email"]
    err = _raise(body)
    assert err.errors == [
        {"loc": "lead.uuid", "msg": "Field required (or lead.email)", "type": "missing"}
    ]
    _assert_no_personal_data(err, "Marco", "+41790000519")


def test_payment_event_needs_the_identifier_of_its_booking() -> None:
    body = load("planned/appointment.booking.payment_failed.flat.json")
    del body["data"]["appointment_uuid"]
    assert _raise(body).errors[0]["loc"] == "appointment.uuid"

    body = load("planned/event.booking.payment_succeeded.nested.json")
    del body["data"]["event"]
    del body["data"]["event_slot"]
    assert _raise(body).errors[0]["loc"] == "event.uuid"


@pytest.mark.parametrize(
    "created", ["yesterday", "2025-14-03 09:12:47", "", "14.03.2025 09:12", 17]
)
def test_unparseable_created(created: object) -> None:
    body = load("customer.created.nested.json")
    body["created"] = created
    err = _raise(body)
    assert [e["loc"] for e in err.errors] == ["created"]
    assert err.errors[0]["type"] == "datetime_parsing"


def test_missing_created() -> None:
    body = load("customer.created.nested.json")
    del body["created"]
    err = _raise(body)
    assert err.errors == [{"loc": "created", "msg": "Field required", "type": "missing"}]


def test_unknown_type_with_bad_created_is_still_a_payload_error() -> None:
    err = _raise({"type": "invoice.paid", "created": "soon", "data": {}})
    assert err.errors[0]["loc"] == "created"


def test_wrongly_typed_values_do_not_leak_into_errors() -> None:
    body = load("appointment.booking.created.nested.json")
    customer = body["data"]["appointment"]["customer"]
    customer["id"] = EMAIL
    customer["birthday"] = EMAIL
    customer["customer_type_id"] = {"email": EMAIL}
    customer["email"] = [EMAIL]
    body["data"]["appointment_services"][0]["price"] = EMAIL
    body["data"]["user"]["bookable"] = EMAIL
    body["created"] = EMAIL

    err = _raise(body)

    assert sorted(e["loc"] for e in err.errors) == [
        "created",
        "customer.birthday",
        "customer.customer_type_id",
        "customer.email",
        "customer.id",
        "services.0.price",
        "user.bookable",
    ]
    _assert_no_personal_data(err, EMAIL, "luca.brunner")


def test_payload_error_is_raised_without_the_validation_error_attached() -> None:
    err = _raise(_customer_without_uuid())
    assert err.__cause__ is None
    assert err.__context__ is None


def test_payload_error_message_names_at_most_five_problems() -> None:
    body = load("customer.created.flat.json")
    for key in ("id", "zip", "birthday", "customer_type_id", "street", "city", "country"):
        body["data"][f"customer_{key}"] = [1]
    err = _raise(body)
    assert len(err.errors) == 7
    assert str(err).endswith("and 2 more")


def test_schema_errors_survive_pickling() -> None:
    err = _raise(_customer_without_uuid())
    again = pickle.loads(pickle.dumps(err))  # noqa: S301
    assert type(again) is PayloadError
    assert (str(again), again.errors) == (str(err), err.errors)


def test_unknown_type_is_never_an_error() -> None:
    body = {
        "type": "invoice.paid",
        "created": "2025-03-14 09:12:47",
        "source": "https://dashboard.calenso.com",
        "data": {"invoice": {"id": 1}, "customer": {"uuid": "u-1"}},
        "whatever": True,
    }
    event = parse_event(body)
    assert type(event) is UnknownEvent
    assert event.family is None
    assert event.type == "invoice.paid"
    assert event.shape == "nested"
    assert event.customer is None
    assert event.raw_data == body["data"]
