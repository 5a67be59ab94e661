"""CRM sync: the contact mapping field by field, the http adapter against a real HTTP server,
the shared rate limit, the handlers' calls running concurrently on one event loop, and the
handlers end to end through the ingress and a real worker."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio

from calhook.store.keys import FINAL_STATES
from calhook.store.pairs import PairStore
from schemas import CustomerEvent, LeadEvent, parse_event
from tests.conftest import FIXTURES, SECRET, Client
from tests.support.fake_crm import TOKEN, FakeCrm, Fault
from tests.support.waiting import await_for, wait_for
from tests.support.worker import WorkerProcess
from workers.crm.contact import Contact, contact_from_customer, contact_from_lead, e164
from workers.crm.http import HttpCrm
from workers.crm.ratelimit import AsyncRateLimiter, RateLimitedCrm, RateLimiter
from workers.errors import Defer, PermanentError
from workers.registry import HandlerContext
from workers.tasks.crm import sync_customer

CUSTOMER_UUID = "c3a9e5d2-41b7-4f0e-8c2d-6e1f0a9b7d34"
AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}


def sample(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


# --- mapping -------------------------------------------------------------------------------


def test_a_calenso_customer_maps_to_a_contact_field_by_field() -> None:
    event = parse_event(sample("customer.created.flat.json"))
    assert isinstance(event, CustomerEvent)

    contact = contact_from_customer(event.customer)

    assert contact == Contact(
        calenso_uuid=CUSTOMER_UUID,
        email="luca.brunner@example.org",
        first_name="Luca",
        last_name="Brunner",
        phone="+41790000142",
        salutation="mr",
        language="de",
        company=None,
        street="Musterweg 7",
        zip="8008",
        city="Zürich",
        country="CH",
        birthday=None,
        lifecycle="customer",
    )
    assert contact.as_json()["source"] == "calenso"


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("+41790000142", None, "+41790000142"),
        ("079 000 01 42", "CH", "+41790000142"),
        ("0041 79 000 01 42", "ch", "+41790000142"),
        ("+49 30 1234567", "CH", "+49301234567"),
        ("not a phone", "CH", None),
        ("", "CH", None),
        (None, None, None),
    ],
)
def test_phones_become_e164(raw: str | None, country: str | None, expected: str | None) -> None:
    assert e164(raw, country) == expected


def test_salutation_language_email_and_blanks_are_normalised() -> None:
    data = sample("customer.updated.nested.json")
    data["data"]["customer"].update(
        salutation="F",
        language="EN-gb",
        email=" Luca.B@Example.ORG ",
        company="  ",
        birthday="1990-02-03",
    )
    event = parse_event(data)
    assert isinstance(event, CustomerEvent)

    contact = contact_from_customer(event.customer)

    assert (contact.salutation, contact.language, contact.email) == (
        "ms",
        "en",
        "luca.b@example.org",
    )
    assert contact.company is None
    assert contact.birthday == dt.date(1990, 2, 3)
    assert contact.as_json()["birthday"] == "1990-02-03"


def test_a_lead_maps_to_a_contact_marked_as_lead() -> None:
    event = parse_event(sample("lead.created.nested.json"))
    assert isinstance(event, LeadEvent)

    contact = contact_from_lead(event.lead)

    assert contact.lifecycle == "lead"
    assert contact.calenso_uuid == "b8c7d6e5-f4a3-4b21-9c0d-1e2f3a4b5c6d"
    assert (contact.first_name, contact.company) == ("Marco", "Frei Beispiel AG")


# --- the http adapter -----------------------------------------------------------------------


@pytest.fixture
async def http_crm(fake_crm: FakeCrm) -> AsyncIterator[HttpCrm]:
    client = HttpCrm(fake_crm.url, TOKEN, timeout_s=2)
    yield client
    await client.close()


CONTACT = Contact(calenso_uuid="u-1", email="a@example.org", first_name="Anna")


async def test_upsert_puts_the_contract_body_with_token_and_idempotency_key(
    http_crm: HttpCrm, fake_crm: FakeCrm
) -> None:
    await http_crm.upsert(CONTACT, idempotency_key="e1:crm")

    [call] = fake_crm.calls_for("u-1")
    assert call.method == "PUT"
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"
    assert call.headers["Idempotency-Key"] == "e1:crm"
    assert fake_crm.contacts["u-1"] == CONTACT.as_json()


async def test_deleting_a_contact_that_is_gone_is_success(
    http_crm: HttpCrm, fake_crm: FakeCrm
) -> None:
    await http_crm.delete("never-existed", idempotency_key="e2:crm")

    assert [c.status for c in fake_crm.calls_for("never-existed")] == [404]


async def test_429_with_a_short_retry_after_is_waited_out_in_the_call(
    http_crm: HttpCrm, fake_crm: FakeCrm
) -> None:
    fake_crm.fail_next(Fault(429, "slow down", retry_after="1"))

    await http_crm.upsert(CONTACT, idempotency_key="e3:crm")

    first, second = fake_crm.calls_for("u-1")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.95


async def test_429_with_a_long_retry_after_waits_without_spending_an_attempt(
    http_crm: HttpCrm, fake_crm: FakeCrm
) -> None:
    fake_crm.fail_next(Fault(429, "come back in a minute", retry_after="60"))

    with pytest.raises(Defer) as raised:
        await http_crm.upsert(CONTACT, idempotency_key="e4:crm")

    assert raised.value.after_s == 60
    assert len(fake_crm.calls_for("u-1")) == 1


async def test_5xx_is_retried_and_other_4xx_is_permanent_with_the_answer(
    http_crm: HttpCrm, fake_crm: FakeCrm
) -> None:
    fake_crm.fail_next(Fault(500), Fault(503))
    await http_crm.upsert(CONTACT, idempotency_key="e5:crm")
    assert [c.status for c in fake_crm.calls_for("u-1")] == [500, 503, 200]

    fake_crm.fail_next(Fault(400, '{"error": "email is invalid"}'))
    with pytest.raises(PermanentError, match=r"CRM answered 400: .*email is invalid"):
        await http_crm.upsert(CONTACT, idempotency_key="e6:crm")


async def test_a_wrong_token_is_permanent_and_not_echoed(fake_crm: FakeCrm) -> None:
    client = HttpCrm(fake_crm.url, "wrong-token-123", timeout_s=2)

    with pytest.raises(PermanentError) as raised:
        await client.upsert(CONTACT, idempotency_key="e7:crm")

    await client.close()
    assert "401" in str(raised.value)
    assert "wrong-token-123" not in str(raised.value)


# --- the shared rate limit ------------------------------------------------------------------


def test_the_bucket_is_shared_and_refills(redis_db: redis.Redis) -> None:
    one, other = (RateLimiter(redis_db, "test", rate_per_s=5, max_wait_s=0) for _ in range(2))

    for limiter in (one, other, one, other, one):  # a burst of one second's worth
        limiter.acquire()
    # Used up: the attempt waits for the next token without spending a step of the schedule.
    with pytest.raises(Defer) as raised:
        other.acquire()

    assert 0 < raised.value.after_s <= 0.2

    def refilled() -> bool:
        try:
            one.acquire()
        except Defer:
            return False
        return True

    wait_for(refilled, timeout_s=2, what="a token to come back")


async def test_coroutines_share_the_bucket_with_sync_callers_and_wait_without_blocking(
    redis_db: redis.Redis, aredis_db: redis.asyncio.Redis
) -> None:
    async def client() -> redis.asyncio.Redis:
        return aredis_db

    limiter = AsyncRateLimiter(client, "test", rate_per_s=5, max_wait_s=0)
    sync = RateLimiter(redis_db, "test", rate_per_s=5, max_wait_s=0)

    for acquire in (limiter.acquire, limiter.acquire, limiter.acquire):
        await acquire()
    sync.acquire()
    sync.acquire()
    # Used up by both together: the same Defer as the sync path, no step of the schedule spent.
    with pytest.raises(Defer) as raised:
        await limiter.acquire()
    assert 0 < raised.value.after_s <= 0.2

    # Given time to wait, the coroutine waits on the loop (a ticker keeps running) for a token.
    waiting = AsyncRateLimiter(client, "test", rate_per_s=5, max_wait_s=2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    await waiting.acquire()
    waited_s = time.monotonic() - started
    ticking.cancel()
    assert 0.05 < waited_s < 1.0
    assert ticks >= 3


# --- one handler, many events, one loop ------------------------------------------------------


def customer_event(uuid: str) -> CustomerEvent:
    data = sample("customer.created.nested.json")
    data["data"]["customer"]["uuid"] = uuid
    event = parse_event(data)
    assert isinstance(event, CustomerEvent)
    return event


async def test_the_calls_of_one_handler_run_concurrently_on_one_loop(
    fake_crm: FakeCrm, aredis_db: redis.asyncio.Redis
) -> None:
    # Given a CRM that takes half a second to answer, behind the shared rate limit
    async def db() -> redis.asyncio.Redis:
        return aredis_db

    delay_s = 0.5
    fake_crm.delay_s = delay_s
    crm = RateLimitedCrm(
        HttpCrm(fake_crm.url, TOKEN, timeout_s=5), AsyncRateLimiter(db, "crm:test", 100)
    )
    uuids = [f"c0000000-0000-4000-8000-00000000000{i}" for i in range(4)]
    contexts = [
        HandlerContext(f"e{i}", "crm.sync_customer", "default", time.time())
        for i in range(len(uuids))
    ]

    # When the handler runs for four events at once on this loop
    started = time.monotonic()
    await asyncio.gather(
        *(sync_customer(customer_event(u), c, crm) for u, c in zip(uuids, contexts, strict=True))
    )
    elapsed_s = time.monotonic() - started

    # Then all four contacts landed in about one delay, not four one after another
    assert set(fake_crm.contacts) == set(uuids)
    assert delay_s <= elapsed_s < 2 * delay_s
    arrivals = sorted(c.at for u in uuids for c in fake_crm.calls_for(u))
    assert arrivals[-1] - arrivals[0] < delay_s  # the last call left before the first answer
    await crm.close()


# --- end to end through the worker ----------------------------------------------------------


async def post(client: Client, body: dict[str, Any]) -> str:
    response = await client.post("/webhooks/calenso", data=orjson.dumps(body), headers=AUTH)
    assert response.status == 202, await response.text()
    return str((await response.json())["event_id"])


def outcome(pairs: PairStore, event_id: str, handler: str) -> str | None:
    """The state of the (event, handler) pair: None until dispatch created it."""
    pair = pairs.states(event_id).get(handler)
    return pair.state if pair else None


async def test_customer_events_upsert_and_delete_the_contact_once(
    client: Client, worker: WorkerProcess, pairs: PairStore, fake_crm: FakeCrm
) -> None:
    created = await post(client, sample("customer.created.nested.json"))
    await await_for(lambda: outcome(pairs, created, "crm.sync_customer") == "done")

    [put] = fake_crm.calls_for(CUSTOMER_UUID)
    assert put.method == "PUT"
    assert put.headers["Idempotency-Key"] == f"{created}:crm.sync_customer"
    assert fake_crm.contacts[CUSTOMER_UUID]["phone"] == "+41790000142"

    deleted = await post(client, sample("customer.deleted.nested.json"))
    await await_for(lambda: outcome(pairs, deleted, "crm.sync_customer") == "done")
    assert [c.method for c in fake_crm.calls_for(CUSTOMER_UUID)] == ["PUT", "DELETE"]
    assert CUSTOMER_UUID not in fake_crm.contacts


async def test_bookings_and_leads_keep_the_crm_current(
    client: Client, worker: WorkerProcess, pairs: PairStore, fake_crm: FakeCrm
) -> None:
    booking = await post(client, sample("event.booking.created.flat.json"))
    lead = await post(client, sample("lead.created.nested.json"))

    await await_for(lambda: outcome(pairs, booking, "crm.sync_booking_customer") == "done")
    await await_for(lambda: outcome(pairs, lead, "crm.sync_lead") == "done")
    assert fake_crm.contacts["e2d4f6a8-1b3c-4d5e-9f70-8a1b2c3d4e5f"]["last_name"] == "Gerber"
    assert fake_crm.contacts["b8c7d6e5-f4a3-4b21-9c0d-1e2f3a4b5c6d"]["lifecycle"] == "lead"


async def test_a_late_older_update_does_not_overwrite_the_crm(
    client: Client, worker: WorkerProcess, pairs: PairStore, fake_crm: FakeCrm
) -> None:
    newer = sample("customer.updated.nested.json")
    newer["created"] = "2025-03-20 10:00:00"
    newer["data"]["customer"]["lastname"] = "Newer"
    older = sample("customer.updated.nested.json")
    older["created"] = "2025-03-19 10:00:00"
    older["data"]["customer"]["lastname"] = "Older"

    first = await post(client, newer)
    await await_for(lambda: outcome(pairs, first, "crm.sync_customer") in FINAL_STATES)
    late = await post(client, older)
    await await_for(lambda: outcome(pairs, late, "crm.sync_customer") in FINAL_STATES)

    assert outcome(pairs, late, "crm.sync_customer") == "stale"
    assert fake_crm.contacts[CUSTOMER_UUID]["last_name"] == "Newer"
    assert len(fake_crm.calls_for(CUSTOMER_UUID)) == 1


async def test_a_crm_refusal_is_dead_lettered_with_its_answer(
    client: Client,
    worker: WorkerProcess,
    pairs: PairStore,
    redis_db: redis.Redis,
    fake_crm: FakeCrm,
) -> None:
    fake_crm.fail_next(Fault(422, '{"error": "lastname too long"}'))

    event_id = await post(client, sample("lead.created.nested.json"))

    await await_for(lambda: outcome(pairs, event_id, "crm.sync_lead") == "dead")
    record = redis_db.hgetall(f"calhook:dead:{event_id}.crm.sync_lead")
    assert record[b"reason"] == b"permanent"
    assert b"CRM answered 422" in record[b"error"]
    assert b"lastname too long" in record[b"error"]


async def test_a_crm_rate_limit_is_honoured_then_the_contact_lands_once(
    client: Client, worker: WorkerProcess, pairs: PairStore, fake_crm: FakeCrm
) -> None:
    fake_crm.fail_next(Fault(429, retry_after="1"), Fault(503))

    event_id = await post(client, sample("customer.created.flat.json"))

    await await_for(lambda: outcome(pairs, event_id, "crm.sync_customer") == "done")
    statuses = [c.status for c in fake_crm.calls_for(CUSTOMER_UUID)]
    assert statuses == [429, 503, 200]
    assert len(fake_crm.contacts) == 1
