from __future__ import annotations

from typing import Any

import pytest

from schemas import Envelope, EnvelopeError, SchemaError, parse_envelope, parse_event
from tests.schemas._support import load


def test_envelope_keeps_raw_created_and_ignores_unknown_keys() -> None:
    body = load("appointment.booking.created.nested.json")
    body["delivery_attempt"] = 3

    envelope = parse_envelope(body)

    assert envelope.type == "appointment.booking.created"
    assert envelope.created == "2025-03-14 09:12:47"
    assert envelope.source == "https://dashboard.calenso.com"
    assert envelope.data is body["data"]
    assert "delivery_attempt" not in envelope.model_dump()


def test_envelope_is_frozen() -> None:
    envelope = parse_envelope({"type": "customer.created", "data": {}})
    with pytest.raises(ValueError, match="frozen"):
        envelope.type = "other"  # type: ignore[misc]


def test_envelope_without_created_or_source() -> None:
    envelope = parse_envelope({"type": "x.y", "data": {"a": 1}})
    assert envelope == Envelope(type="x.y", created=None, source=None, data={"a": 1})


def test_non_string_created_is_kept_as_text_for_later() -> None:
    envelope = parse_envelope({"type": "x.y", "created": 1710406367, "data": {}})
    assert envelope.created == "1710406367"


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ([], "array"),
        ("appointment.booking.created", "string"),
        (42, "number"),
        (None, "null"),
        (True, "boolean"),
    ],
)
def test_body_that_is_not_an_object_is_refused(body: object, kind: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(body)
    assert str(caught.value) == f"the body must be a JSON object, got {kind}"
    assert caught.value.errors == [
        {"loc": "", "msg": f"the body must be a JSON object, got {kind}", "type": "dict_type"}
    ]


@pytest.mark.parametrize(
    ("event_type", "message", "kind"),
    [
        (7, "`type` must be a string, got number", "string_type"),
        (None, "`type` must be a string, got null", "string_type"),
        (["customer.created"], "`type` must be a string, got array", "string_type"),
        ({"name": "customer.created"}, "`type` must be a string, got object", "string_type"),
        (False, "`type` must be a string, got boolean", "string_type"),
        ("", "`type` must not be empty", "string_too_short"),
        ("   ", "`type` must not be empty", "string_too_short"),
    ],
)
def test_bad_type_is_refused(event_type: object, message: str, kind: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope({"type": event_type, "data": {}})
    assert str(caught.value) == message
    assert caught.value.errors == [{"loc": "type", "msg": message, "type": kind}]


def test_missing_type_is_refused() -> None:
    with pytest.raises(EnvelopeError, match=r"^`type` is missing$") as caught:
        parse_envelope({"data": {}})
    assert caught.value.errors[0]["loc"] == "type"
    assert caught.value.errors[0]["type"] == "missing"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "`data` must be an object, got array"),
        ([{"customer": {}}], "`data` must be an object, got array"),
        ("{}", "`data` must be an object, got string"),
        (None, "`data` must be an object, got null"),
        (1, "`data` must be an object, got number"),
    ],
)
def test_data_that_is_not_an_object_is_refused(data: object, message: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope({"type": "customer.created", "data": data})
    assert str(caught.value) == message
    assert caught.value.errors == [{"loc": "data", "msg": message, "type": "dict_type"}]


def test_missing_data_is_refused() -> None:
    with pytest.raises(EnvelopeError, match=r"^`data` is missing$"):
        parse_envelope({"type": "customer.created", "created": "2025-03-14 09:12:46"})


def test_every_envelope_problem_is_reported_at_once() -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope({"type": 3})
    assert [e["loc"] for e in caught.value.errors] == ["type", "data"]
    assert str(caught.value) == "`type` must be a string, got number; `data` is missing"


def test_envelope_error_is_a_schema_error_and_a_value_error() -> None:
    with pytest.raises(SchemaError):
        parse_envelope([])
    with pytest.raises(ValueError, match="JSON object"):
        parse_envelope([])


@pytest.mark.parametrize(
    "body",
    [[], {"type": None, "data": {}}, {"type": "customer.created"}, {"type": "x", "data": []}],
)
def test_parse_event_raises_envelope_error_for_a_raw_body(body: Any) -> None:
    with pytest.raises(EnvelopeError):
        parse_event(body)
