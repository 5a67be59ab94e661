"""The HubSpot adapter against a fake HubSpot over real HTTP: mapping, upsert, archive, faults."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.support.fake_hubspot import FakeHubSpot, Fault
from workers.crm.client import CrmUnavailable
from workers.crm.contact import Contact
from workers.crm.hubspot import HubSpotCrm, hubspot_properties
from workers.errors import Defer, PermanentError, RetryLater, TransientError

TOKEN = "pat-eu1-0000aaaa-1111-bbbb-2222-cccc3333dddd"
KEY = "evt-1:crm.sync_customer"
UUID = "6f1c2d3e-0000-4000-8000-00000000c001"
UPSERT = "*/batch/upsert"

FULL = Contact(
    calenso_uuid=UUID,
    email="luca.brunner@example.org",
    first_name="Luca",
    last_name="Brunner",
    phone="+41790000142",
    salutation="mr",
    language="de",
    company="Brunner AG",
    street="Bahnhofstrasse 1",
    zip="8001",
    city="Zürich",
    country="CH",
    birthday=dt.date(1990, 5, 17),
    lifecycle="customer",
)


@pytest.fixture
def hubspot() -> Iterator[FakeHubSpot]:
    fake = FakeHubSpot(token=TOKEN).start()
    yield fake
    fake.stop()


@pytest.fixture
async def make_crm(hubspot: FakeHubSpot) -> AsyncIterator[Callable[..., HubSpotCrm]]:
    """HubSpotCrm clients on the fake; closed at the end."""
    made: list[HubSpotCrm] = []

    def make(token: str = TOKEN, **kwargs: Any) -> HubSpotCrm:
        client = HubSpotCrm(token, base_url=hubspot.url, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def crm(make_crm: Callable[..., HubSpotCrm]) -> HubSpotCrm:
    return make_crm()


# --- the mapping, field by field ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "prop", "expected"),
    [
        ("first_name", "Luca", "firstname", "Luca"),
        ("last_name", "Brunner", "lastname", "Brunner"),
        ("email", "luca@example.org", "email", "luca@example.org"),
        ("phone", "+41790000142", "phone", "+41790000142"),
        ("salutation", "mr", "salutation", "Mr"),
        ("salutation", "ms", "salutation", "Ms"),
        ("language", "fr", "hs_language", "fr"),
        ("street", "Bahnhofstrasse 1", "address", "Bahnhofstrasse 1"),
        ("zip", "8001", "zip", "8001"),
        ("city", "Zürich", "city", "Zürich"),
        ("country", "CH", "country", "CH"),
        ("company", "Brunner AG", "company", "Brunner AG"),
        ("birthday", dt.date(1990, 5, 17), "date_of_birth", "1990-05-17"),
        ("lifecycle", "lead", "lifecyclestage", "lead"),
        ("lifecycle", "customer", "lifecyclestage", "customer"),
    ],
)
def test_each_field_maps_to_its_hubspot_property(
    field: str, value: Any, prop: str, expected: str
) -> None:
    # Given a contact with only this field set (besides its uuid and lifecycle)
    contact = dataclasses.replace(Contact(calenso_uuid=UUID), **{field: value})
    # When it is mapped
    properties = hubspot_properties(contact, "calenso_uuid")
    # Then the field lands in its property, and the key property carries the uuid
    assert properties[prop] == expected
    assert properties["calenso_uuid"] == UUID


def test_empty_fields_are_left_out_not_blanked() -> None:
    properties = hubspot_properties(Contact(calenso_uuid=UUID), "calenso_uuid")
    assert properties == {"calenso_uuid": UUID, "lifecyclestage": "customer"}


def test_unknown_codes_are_left_out_rather_than_guessed() -> None:
    contact = Contact(calenso_uuid=UUID, salutation="dr", lifecycle="partner")
    assert hubspot_properties(contact, "calenso_uuid") == {"calenso_uuid": UUID}


def test_keyed_by_email_the_uuid_property_is_not_sent() -> None:
    properties = hubspot_properties(FULL, "email")
    assert "calenso_uuid" not in properties
    assert properties["email"] == FULL.email


def test_a_custom_id_property_carries_the_uuid() -> None:
    assert hubspot_properties(FULL, "calenso_customer_id")["calenso_customer_id"] == UUID


# --- upsert ---------------------------------------------------------------------------------


async def test_upsert_creates_then_updates_the_same_contact(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    # Given a contact upserted once
    await crm.upsert(FULL, idempotency_key=KEY)
    [created] = hubspot.contacts()
    assert created["properties"] == {
        "hs_object_id": created["id"],
        **hubspot_properties(FULL, "calenso_uuid"),
    }
    # When it is upserted again with a new last name and no phone
    await crm.upsert(dataclasses.replace(FULL, last_name="Meier", phone=None), idempotency_key=KEY)
    # Then HubSpot still has one contact: the name is updated, the phone is kept
    [updated] = hubspot.contacts()
    assert updated["id"] == created["id"]
    assert updated["properties"]["lastname"] == "Meier"
    assert updated["properties"]["phone"] == "+41790000142"
    # And the calls were HubSpot's batch upsert with one input, keyed by calenso_uuid
    calls = hubspot.calls()
    assert [(c.method, c.path) for c in calls] == [
        ("POST", "/crm/v3/objects/contacts/batch/upsert")
    ] * 2
    [item] = calls[1].json["inputs"]
    assert item["id"] == UUID
    assert item["idProperty"] == "calenso_uuid"
    assert "phone" not in item["properties"]
    assert all(c.headers["Authorization"] == f"Bearer {TOKEN}" for c in calls)


async def test_upsert_by_email(hubspot: FakeHubSpot, make_crm: Callable[..., HubSpotCrm]) -> None:
    crm = make_crm(id_property="email")
    await crm.upsert(FULL, idempotency_key=KEY)
    await crm.upsert(dataclasses.replace(FULL, city="Bern"), idempotency_key=KEY)

    [stored] = hubspot.contacts()
    assert stored["properties"]["email"] == FULL.email
    assert stored["properties"]["city"] == "Bern"
    assert "calenso_uuid" not in stored["properties"]
    [item] = hubspot.calls()[0].json["inputs"]
    assert (item["id"], item["idProperty"]) == (FULL.email, "email")


async def test_upsert_by_email_without_email_is_permanent(
    hubspot: FakeHubSpot, make_crm: Callable[..., HubSpotCrm]
) -> None:
    crm = make_crm(id_property="email")
    with pytest.raises(PermanentError, match="no e-mail"):
        await crm.upsert(dataclasses.replace(FULL, email=None), idempotency_key=KEY)
    assert hubspot.calls() == []


async def test_a_batch_error_in_a_2xx_answer_is_permanent(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    hubspot.inject(
        Fault(
            status=207,
            body={
                "status": "COMPLETE",
                "results": [],
                "numErrors": 1,
                "errors": [{"status": "error", "message": "Property zip is read-only"}],
            },
        ),
        path=UPSERT,
    )
    with pytest.raises(PermanentError, match="Property zip is read-only"):
        await crm.upsert(FULL, idempotency_key=KEY)


# --- delete ---------------------------------------------------------------------------------


async def test_delete_archives_the_contact(hubspot: FakeHubSpot, crm: HubSpotCrm) -> None:
    await crm.upsert(FULL, idempotency_key=KEY)
    [stored] = hubspot.contacts()

    await crm.delete(UUID, idempotency_key=KEY)

    assert hubspot.contacts() == []
    assert [c["id"] for c in hubspot.contacts(archived=True)] == [stored["id"]]
    read, archive = hubspot.calls()[1:]
    assert (read.method, read.path, read.query) == (
        "GET",
        f"/crm/v3/objects/contacts/{UUID}",
        {"idProperty": "calenso_uuid"},
    )
    assert (archive.method, archive.path) == (
        "DELETE",
        f"/crm/v3/objects/contacts/{stored['id']}",
    )


async def test_delete_of_a_missing_contact_succeeds(hubspot: FakeHubSpot, crm: HubSpotCrm) -> None:
    await crm.delete(UUID, idempotency_key=KEY)
    assert [c.method for c in hubspot.calls()] == ["GET"]


async def test_a_contact_gone_between_read_and_archive_is_deleted(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    await crm.upsert(FULL, idempotency_key=KEY)
    hubspot.inject(Fault.not_found(), method="DELETE")
    await crm.delete(UUID, idempotency_key=KEY)
    assert [c.method for c in hubspot.calls()] == ["POST", "GET", "DELETE"]


async def test_delete_by_email(hubspot: FakeHubSpot, make_crm: Callable[..., HubSpotCrm]) -> None:
    crm = make_crm(id_property="email")
    await crm.upsert(FULL, idempotency_key=KEY)
    assert FULL.email is not None
    await crm.delete(FULL.email, idempotency_key=KEY)
    assert hubspot.contacts() == []
    # A Calenso uuid cannot find a contact keyed by e-mail: refused, not guessed
    with pytest.raises(PermanentError, match="keyed by e-mail"):
        await crm.delete(UUID, idempotency_key=KEY)


# --- faults ---------------------------------------------------------------------------------


async def test_429_with_a_short_retry_after_is_waited_out_in_the_call(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    hubspot.inject(Fault.rate_limited(retry_after_s=1), path=UPSERT)

    await crm.upsert(FULL, idempotency_key=KEY)

    first, second = hubspot.calls()
    assert 0.95 <= second.at - first.at < 3.0
    assert len(hubspot.contacts()) == 1


async def test_429_with_a_long_retry_after_waits_without_spending_an_attempt(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    hubspot.inject(Fault.rate_limited(retry_after_s=60), path=UPSERT)

    with pytest.raises(Defer) as caught:
        await crm.upsert(FULL, idempotency_key=KEY)

    assert caught.value.after_s == pytest.approx(60, abs=1)
    assert len(hubspot.calls()) == 1  # not retried, not waited for


async def test_429_without_retry_after_waits_the_rate_limit_interval(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    hubspot.inject(Fault.rate_limited(interval_ms=10_000), path=UPSERT)

    with pytest.raises(RetryLater) as caught:
        await crm.upsert(FULL, idempotency_key=KEY)

    assert caught.value.after_s == pytest.approx(10)
    assert len(hubspot.calls()) == 1


async def test_429_with_the_secondly_budget_spent_waits_a_second(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    hubspot.inject(Fault.rate_limited(interval_ms=None), path=UPSERT)

    await crm.upsert(FULL, idempotency_key=KEY)

    first, second = hubspot.calls()
    assert 0.95 <= second.at - first.at < 3.0


async def test_500_twice_then_success(hubspot: FakeHubSpot, crm: HubSpotCrm) -> None:
    hubspot.inject(Fault.server_error(), times=2)

    await crm.upsert(FULL, idempotency_key=KEY)

    assert len(hubspot.calls()) == 3
    assert len(hubspot.contacts()) == 1


async def test_500_every_time_is_transient(hubspot: FakeHubSpot, crm: HubSpotCrm) -> None:
    hubspot.inject(Fault.server_error(), times=10)
    with pytest.raises(CrmUnavailable):
        await crm.upsert(FULL, idempotency_key=KEY)
    assert len(hubspot.calls()) == 3


async def test_a_slow_answer_times_out_and_is_retried(
    hubspot: FakeHubSpot, make_crm: Callable[..., HubSpotCrm]
) -> None:
    crm = make_crm(timeout_s=0.3)
    hubspot.inject(Fault.slow(2.0), path=UPSERT)

    await crm.upsert(FULL, idempotency_key=KEY)

    assert len(hubspot.calls()) == 2


async def test_400_is_permanent_and_carries_hubspots_answer(
    hubspot: FakeHubSpot, crm: HubSpotCrm
) -> None:
    hubspot.inject(Fault.bad_request("Property values were not valid: date_of_birth"))

    with pytest.raises(PermanentError, match="Property values were not valid: date_of_birth"):
        await crm.upsert(FULL, idempotency_key=KEY)
    assert len(hubspot.calls()) == 1


async def test_a_property_hubspot_does_not_know_is_permanent(
    hubspot: FakeHubSpot, make_crm: Callable[..., HubSpotCrm]
) -> None:
    crm = make_crm(id_property="customer_no")
    with pytest.raises(PermanentError, match=r"400.*customer_no"):
        await crm.upsert(FULL, idempotency_key=KEY)


async def test_a_wrong_token_is_permanent(
    hubspot: FakeHubSpot, make_crm: Callable[..., HubSpotCrm]
) -> None:
    crm = make_crm(token="pat-eu1-wrong")
    with pytest.raises(PermanentError, match="401") as caught:
        await crm.upsert(FULL, idempotency_key=KEY)
    assert "pat-eu1-wrong" not in str(caught.value)
    with pytest.raises(PermanentError, match="401"):
        await crm.delete(UUID, idempotency_key=KEY)
    assert hubspot.contacts() == []


# --- secrets and personal data --------------------------------------------------------------


def _messages(exc: BaseException | None) -> list[str]:
    found: list[str] = []
    while exc is not None:
        found += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return found


@pytest.mark.parametrize(
    ("fault", "times", "timeout_s", "error"),
    [
        (Fault.bad_request("bad", echo_headers=True), 1, 10.0, PermanentError),
        (Fault(status=503, body={"echo": TOKEN}), 5, 10.0, TransientError),
        (
            Fault(status=429, body={"echo": TOKEN}, headers={"Retry-After": "30"}),
            1,
            10.0,
            Defer,
        ),
        (Fault.slow(2.0), 5, 0.2, TransientError),
    ],
    ids=["400-echoing-headers", "503-echoing-token", "429-long", "timeouts"],
)
async def test_the_token_never_appears_in_an_error(
    hubspot: FakeHubSpot,
    make_crm: Callable[..., HubSpotCrm],
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    times: int,
    timeout_s: float,
    error: type[Exception],
) -> None:
    caplog.set_level(logging.DEBUG)
    crm = make_crm(timeout_s=timeout_s)
    hubspot.inject(fault, times=times)

    with pytest.raises(error) as caught:
        await crm.upsert(FULL, idempotency_key=KEY)

    assert hubspot.calls()[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert all(TOKEN not in m for m in _messages(caught.value))
    assert TOKEN not in caplog.text


async def test_logs_carry_no_contact_fields(
    hubspot: FakeHubSpot, crm: HubSpotCrm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="calhook.crm")
    await crm.upsert(FULL, idempotency_key=KEY)
    await crm.delete(UUID, idempotency_key=KEY)
    records = [r for r in caplog.records if r.name == "calhook.crm"]
    assert records
    text = " ".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    for value in ("luca.brunner", "Luca", "Brunner", "+41790000142", "Bahnhofstrasse", TOKEN):
        assert value not in text
    assert UUID in text
