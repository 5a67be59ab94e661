from __future__ import annotations

import pytest

from schemas import CURRENT_TYPES, KNOWN_TYPES, PLANNED_TYPES, Family, family_of


def test_catalogue_lists_eleven_current_and_four_planned_types() -> None:
    assert len(CURRENT_TYPES) == 11
    assert len(PLANNED_TYPES) == 4
    assert KNOWN_TYPES == CURRENT_TYPES | PLANNED_TYPES
    assert not CURRENT_TYPES & PLANNED_TYPES


@pytest.mark.parametrize(
    ("event_type", "family"),
    [
        ("appointment.booking.created", Family.APPOINTMENT),
        ("appointment.manual.booking.created", Family.APPOINTMENT),
        ("appointment.booking.cancelled", Family.APPOINTMENT),
        ("appointment.updated", Family.APPOINTMENT),
        ("event.booking.created", Family.GROUP_EVENT),
        ("event.manual.booking.created", Family.GROUP_EVENT),
        ("event.booking.cancelled", Family.GROUP_EVENT),
        ("customer.created", Family.CUSTOMER),
        ("customer.updated", Family.CUSTOMER),
        ("customer.deleted", Family.CUSTOMER),
        ("lead.created", Family.LEAD),
        ("appointment.booking.payment_succeeded", Family.PAYMENT),
        ("appointment.booking.payment_failed", Family.PAYMENT),
        ("event.booking.payment_succeeded", Family.PAYMENT),
        ("event.booking.payment_failed", Family.PAYMENT),
    ],
)
def test_family_of_every_known_type(event_type: str, family: Family) -> None:
    assert event_type in KNOWN_TYPES
    assert family_of(event_type) is family


@pytest.mark.parametrize("event_type", ["", "appointment", "invoice.created", "Customer.Created"])
def test_family_of_unknown_type_is_none(event_type: str) -> None:
    assert family_of(event_type) is None


def test_family_values_are_stable_strings() -> None:
    assert [f.value for f in Family] == [
        "appointment",
        "group_event",
        "customer",
        "lead",
        "payment",
    ]
    assert Family("group_event") == "group_event"
