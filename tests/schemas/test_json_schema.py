from __future__ import annotations

import json

from schemas import KNOWN_TYPES, event_json_schema

MODELS = [
    "Envelope",
    "AppointmentEvent",
    "GroupEventEvent",
    "CustomerEvent",
    "LeadEvent",
    "PaymentEvent",
    "UnknownEvent",
    "Customer",
    "Staff",
    "Worker",
    "Store",
    "Service",
    "Appointment",
    "GroupEvent",
    "EventSlot",
    "Lead",
    "Payment",
]


def test_schema_is_json_and_deterministic() -> None:
    text = json.dumps(event_json_schema(), sort_keys=True)
    assert json.dumps(event_json_schema(), sort_keys=True) == text
    assert json.loads(text)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_defines_every_model() -> None:
    schema = event_json_schema()
    assert set(MODELS) <= set(schema["$defs"])
    refs = {ref["$ref"] for ref in schema["anyOf"]}
    assert refs == {
        f"#/$defs/{name}"
        for name in MODELS
        if name.endswith("Event") and name not in {"GroupEvent"}
    }


def test_schema_maps_every_known_type_to_its_model() -> None:
    mapping = event_json_schema()["x-event-types"]
    assert set(mapping) == KNOWN_TYPES
    assert mapping["appointment.updated"] == "AppointmentEvent"
    assert mapping["event.booking.payment_failed"] == "PaymentEvent"
    assert mapping["lead.created"] == "LeadEvent"


def test_schema_describes_canonical_views_not_raw_payloads() -> None:
    defs = event_json_schema()["$defs"]
    appointment_event = defs["AppointmentEvent"]["properties"]
    assert "raw_data" not in appointment_event
    assert {"appointment", "customer", "services", "created", "shape"} <= set(appointment_event)
    assert "first_name" in defs["Customer"]["properties"]
    assert "prename" not in defs["Customer"]["properties"]
    assert defs["Envelope"]["required"] == ["type", "data"]
    assert defs["CustomerEvent"]["required"] == ["type", "created", "shape", "customer"]
