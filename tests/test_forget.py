"""``calhook forget``: one customer's data leaves every store in Redis; another's stays.

Each test puts two customers in the stores, forgets one through the real command, then reads
every key and every value of the database (message bodies decoded) looking for the forgotten
customer's uuid, e-mail, phone and names.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection
from pytest_aiohttp import AiohttpClient

from calhook.constants import dispatched_key, pair_id
from calhook.messages import Delivery
from calhook.settings import Settings
from ingest import create_app
from tests.conftest import FIXTURES, SECRET, Client
from tests.support.cli import calhook
from tests.support.recording import FAILING_TYPE, RETRY_LATER_TYPE
from tests.support.waiting import await_for
from tests.support.worker import WorkerProcess
from workers.delayed import DelayedStore
from workers.dispatch import handler_message
from workers.ledger import Ledger, Outcome
from workers.notify.chat import posted_key
from workers.notify.mail import SentLog
from workers.ordering import UPDATE, OrderGuard, Version
from workers.stats import note_failure
from workers.stores import DEAD, PARKED, RecordStore
from workers.trail import Trail
from workers.watchdog import Watchdog

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
APPOINTMENT = "0f6b2d4e-8a1c-4e3f-b5d7-2c9a6e8f1b35"
# The fixtures' customer, and another one made from the same fixtures.
LUCA = {
    "uuid": "c3a9e5d2-41b7-4f0e-8c2d-6e1f0a9b7d34",
    "email": "luca.brunner@example.org",
    "phone": "+41790000142",
    "prename": "Luca",
    "lastname": "Brunner",
    "appointment": APPOINTMENT,
}
ANNA = {
    "uuid": "5d1e8f20-3c4b-4a6d-9e7f-0a1b2c3d4e5f",
    "email": "annalena.vonarx@example.net",
    "phone": "+41790000999",
    "prename": "Annalena",
    "lastname": "Vonarx",
    "appointment": "aa6b2d4e-8a1c-4e3f-b5d7-2c9a6e8f1b99",
}
Person = dict[str, str]


def payload(fixture: str, person: Person) -> str:
    """A fixture's body, about ``person``."""
    text = (FIXTURES / fixture).read_text()
    for field in ("uuid", "email", "phone", "prename", "lastname", "appointment"):
        text = text.replace(LUCA[field], person[field])
    return text


def personal_data(person: Person) -> list[str]:
    return [person[f].lower() for f in ("uuid", "email", "phone", "prename", "lastname")]


# Reading all of Redis -----------------------------------------------------------------------


def _unwrap(value: Any) -> Any:
    """JSON with every kombu message body (base64) decoded in place."""
    if isinstance(value, dict):
        props = value.get("properties")
        if isinstance(props, dict) and props.get("body_encoding") == "base64":
            value = {**value, "body": json.loads(base64.b64decode(value["body"]))}
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def readable(raw: bytes) -> str:
    """A stored value as text a person could read: task messages decoded, lower case."""
    text = raw.decode("utf-8", "replace")
    head, sep, rest = text.partition("\n")  # delayed-store and watchdog entries: queue\nmessage
    for prefix, candidate in (("", text), (head + sep, rest)):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        return (prefix + json.dumps(_unwrap(value), ensure_ascii=False)).lower()
    return text.lower()


def everything(client: redis.Redis) -> dict[str, str]:
    """Every key of the database → its name and all it holds, readable.

    Keys under ``calhook:test:`` belong to the test handlers: they stand for the systems
    downstream (a CRM) that calhook hands data to and cannot erase.
    """
    found = {}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if name.startswith("calhook:test:"):
            continue
        kind = client.type(key).decode()  # type: ignore[union-attr]
        items: list[bytes]
        if kind == "string":
            items = [client.get(key)]  # type: ignore[list-item]
        elif kind == "list":
            items = client.lrange(key, 0, -1)  # type: ignore[assignment]
        elif kind == "hash":
            pairs: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
            items = [part for pair in pairs.items() for part in pair]
        elif kind == "set":
            items = sorted(client.smembers(key))  # type: ignore[arg-type]
        elif kind == "zset":
            items = client.zrange(key, 0, -1)  # type: ignore[assignment]
        else:
            raise AssertionError(f"{name}: a {kind} calhook does not write")
        found[name] = "\n".join([name.lower(), *(readable(i) for i in items if i is not None)])
    return found


def holding(client: redis.Redis, needle: str) -> list[str]:
    """The keys whose name or content mentions ``needle``."""
    return sorted(k for k, text in everything(client).items() if needle.lower() in text)


def assert_gone(client: redis.Redis, person: Person) -> None:
    for value in personal_data(person):
        assert holding(client, value) == [], value


# Every store, filled by the store classes and the ingress -----------------------------------


@pytest.fixture
def quiet_url(redis_url: str) -> Iterator[str]:
    """Another database of the test Redis, out of reach of the session's worker: what is
    queued there stays queued."""
    url = urllib.parse.urlsplit(redis_url)._replace(path="/7").geturl()
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def quiet_db(quiet_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(quiet_url)
    yield client
    client.close()


@pytest.fixture
async def quiet_ingress(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], quiet_url: str
) -> Client:
    return await aiohttp_client(create_app(make_settings(redis_url=quiet_url)))


async def fill(client: Client, db: redis.Redis, url: str, person: Person, tag: str) -> None:
    """Put ``person`` in every store calhook keeps; event ids start with ``tag``."""
    # Queued for dispatch (with watchdog copies and dedup keys), as the ingress writes them.
    for fixture in ("customer.created.nested.json", "appointment.booking.created.flat.json"):
        response = await client.post("/webhooks/calenso", data=payload(fixture, person),
                                     headers=AUTH)  # fmt: skip
        assert response.status == 202, await response.text()
    watchdog = Watchdog(db, watchdog_s=1800)
    now = time.time()

    def message(event_id: str, fixture: str, handler: str, queue: str) -> bytes:
        delivery = Delivery(event_id, payload(fixture, person), "default", now)
        return handler_message(handler, queue, delivery, fixture.split(".json")[0], 1)

    # A handler task waiting on its queue.
    queued = message(f"{tag}-crm", "customer.updated.nested.json", "crm.sync_customer", "crm")
    db.lpush("crm", queued)
    watchdog.arm(pair_id(f"{tag}-crm", "crm.sync_customer"), "crm", queued, now)
    # A retry due in an hour.
    retry = message(f"{tag}-retry", "appointment.updated.nested.json", "notify.mail", "notify")
    DelayedStore(db).schedule(f"{pair_id(f'{tag}-retry', 'notify.mail')}#2", "notify", retry,
                              now + 3600)  # fmt: skip
    watchdog.arm(pair_id(f"{tag}-retry", "notify.mail"), "notify", retry, now + 3600)
    # A task a worker took and has not acked: kombu itself records it as unacked.
    taken = message(f"{tag}-taken", "appointment.booking.cancelled.flat.json", "notify.chat",
                    "taken")  # fmt: skip
    db.lpush("taken", taken)
    watchdog.arm(pair_id(f"{tag}-taken", "notify.chat"), "taken", taken, now)
    with Connection(url) as conn:
        channel: Any = conn.default_channel  # kombu's Redis channel
        assert channel.basic_get("taken", no_ack=False) is not None
        channel.qos._delivered.clear()  # a worker that died holding it: nothing to restore
    # Parked, and a dead letter, with their trails, ledger entries and a recent failure.
    trail = Trail(db, ttl_s=86_400)
    parked_body = payload("customer.updated.flat.json", person).replace(
        "customer.updated", "customer.merged"
    )
    RecordStore(db, PARKED).put(f"{tag}-parked", {"event_id": f"{tag}-parked",
        "type": "customer.merged", "endpoint": "default", "received_at": repr(now),
        "reason": "unknown_type", "errors": [], "body": parked_body})  # fmt: skip
    trail.received(f"{tag}-parked", now, type="customer.merged")
    trail.add(f"{tag}-parked", "parked", reason="unknown_type")
    dead = Delivery(f"{tag}-dead", payload("customer.updated.nested.json", person), "default", now)
    RecordStore(db, DEAD).put(pair_id(dead.event_id, "crm.sync_customer"), {
        **{k: str(v) for k, v in dead.task_kwargs().items()}, "handler": "crm.sync_customer",
        "queue": "crm", "reason": "permanent", "error": "PermanentError: 400"})  # fmt: skip
    ledger = Ledger(db, ttl_s=86_400)
    ledger.count_delivery(dead.event_id, "crm.sync_customer", 1)
    ledger.record(dead.event_id, "crm.sync_customer", Outcome.DEAD)
    note_failure(db, event_id=dead.event_id, handler="crm.sync_customer", attempt=1,
                 outcome="dead_permanent", error="PermanentError", at=now)  # fmt: skip
    trail.received(dead.event_id, now, type="customer.updated")
    # An event handled long ago: only its order versions still name the customer.
    guard = OrderGuard(db, ttl_s=86_400, lock_s=10)
    for scope, entity in (("crm", f"customer:{person['uuid']}"),
                          ("appointment_log", f"appointment:{person['appointment']}")):  # fmt: skip
        with guard.hold(scope, Version(entity, int(now), UPDATE, f"{tag}-done")) as fresh:
            assert fresh
    trail.received(f"{tag}-done", now, type="customer.updated")
    ledger.record(f"{tag}-done", "crm.sync_customer", Outcome.DONE)
    db.set(dispatched_key(f"{tag}-done"), 1)
    # Notification marks of the taken task and of the retry.
    SentLog(db, f"{tag}-taken:notify.chat").add("ops@example.com")
    db.set(posted_key(f"{tag}-retry:notify.mail"), 1)


async def test_forget_erases_one_customer_from_every_store(
    quiet_ingress: Client, quiet_db: redis.Redis, quiet_url: str
) -> None:
    await fill(quiet_ingress, quiet_db, quiet_url, LUCA, "luca")
    await fill(quiet_ingress, quiet_db, quiet_url, ANNA, "anna")
    stores_of_anna = holding(quiet_db, ANNA["uuid"])
    assert holding(quiet_db, LUCA["uuid"]) != []

    report = json.loads(calhook(quiet_url, "forget", LUCA["uuid"].upper(), "--json"))

    assert_gone(quiet_db, LUCA)
    for value in personal_data(ANNA):
        assert holding(quiet_db, value) != [], value
    assert holding(quiet_db, ANNA["uuid"]) == stores_of_anna
    assert report["customer_uuid"] == LUCA["uuid"]
    assert report["removed"] == {
        "parked": 1,
        "dead_letters": 1,
        "delayed": 1,
        "watchdog": 5,  # two dispatches, the queued task, the retry, the taken task
        "queued": 3,  # two dispatches, the crm task
        "unacked": 1,
        "ordering": 2,  # the customer and the appointment
        "trails": 3,
        "ledger": 3,
        "dispatch_markers": 1,
        "dedup": 2,
        "notify_marks": 2,
        "recent_failures": 1,
    }
    assert report["work_dropped"] == 5
    expected = {"luca-crm", "luca-retry", "luca-taken", "luca-parked", "luca-dead", "luca-done"}
    assert expected <= set(report["event_ids"])
    assert len(report["event_ids"]) == len(expected) + 2  # and the two the ingress named
    assert int(quiet_db.zcard("unacked_index")) == 1  # Anna's taken task is still there

    # A second run finds nothing; the other customer goes with a readable report.
    again = json.loads(calhook(quiet_url, "forget", LUCA["uuid"], "--json"))
    text = calhook(quiet_url, "forget", ANNA["uuid"])

    assert again["total"] == 0
    assert_gone(quiet_db, ANNA)
    assert f"customer {ANNA['uuid']}: 26 items removed, from 8 events" in text
    assert "5 queued task(s) or retries were erased" in text
    for value in personal_data(ANNA)[1:]:
        assert value not in text.lower()


def test_forget_refuses_what_is_not_a_uuid(redis_url: str, redis_db: redis.Redis) -> None:
    for wrong in ("", "1", "luca.brunner@example.org"):
        with pytest.raises(subprocess.CalledProcessError) as failed:
            calhook(redis_url, "forget", wrong)
        assert "is not a customer uuid" in failed.value.stderr


# Through the real pipeline --------------------------------------------------------------------


async def post(client: Client, event_type: str, person: Person) -> str:
    customer = json.loads(payload("customer.created.nested.json", person))["data"]["customer"]
    body = {"type": event_type, "created": "2025-06-01 12:00:00",
            "data": {"customer": customer, "after_s": 600}}  # fmt: skip
    response = await client.post("/webhooks/calenso", data=json.dumps(body), headers=AUTH)
    assert response.status == 202, await response.text()
    return str((await response.json())["event_id"])


async def test_forget_after_the_real_pipeline(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis, redis_url: str
) -> None:
    ids: dict[str, dict[str, str]] = {}
    for name, person in (("luca", LUCA), ("anna", ANNA)):
        ids[name] = {
            "dead": await post(client, FAILING_TYPE, person),  # dead-lettered after retries
            "parked": await post(client, "customer.merged", person),  # a type nobody knows
            "retry": await post(client, RETRY_LATER_TYPE, person),  # waits 10 minutes
        }
        response = await client.post(
            "/webhooks/calenso", data=payload("customer.created.nested.json", person), headers=AUTH
        )
        ids[name]["done"] = str((await response.json())["event_id"])

    def settled() -> bool:
        return all(
            redis_db.exists(f"calhook:dead:{i['dead']}.explode")
            and redis_db.exists(f"calhook:parked:{i['parked']}")
            and redis_db.hexists("calhook:delayed:messages", f"{i['retry']}.retry_later#2")
            and redis_db.hget(f"calhook:ledger:{i['done']}", "fake_crm") == b"done"
            for i in ids.values()
        )

    await await_for(settled, timeout_s=60, what="dead letters, parked events, retries")

    report = json.loads(calhook(redis_url, "forget", LUCA["uuid"], "--json"))

    assert_gone(redis_db, LUCA)
    for value in personal_data(ANNA):
        assert holding(redis_db, value) != [], value
    removed = report["removed"]
    assert (removed["parked"], removed["dead_letters"], removed["delayed"]) == (1, 1, 1)
    assert removed["watchdog"] >= 1  # the retry's
    assert removed["ordering"] >= 1  # fake_crm's version of the customer
    assert set(ids["luca"].values()) <= set(report["event_ids"])
    assert not redis_db.exists(f"calhook:trail:{ids['luca']['done']}")
    assert redis_db.exists(f"calhook:trail:{ids['anna']['done']}")
