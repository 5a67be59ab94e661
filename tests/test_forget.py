"""``calhook forget``: one customer's data leaves every store in Redis; another's stays.

Each test puts two customers in the stores, reaching each state through the real transitions
(the ingress, and the store's scripts as dispatch and the workers run them), forgets one through
the real command, then reads every key and every value of the database (message bodies
decoded) looking for the forgotten customer's uuid, e-mail, phone and names.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from kombu import Connection
from pytest_aiohttp import AiohttpClient

from calhook.constants import trail_key
from calhook.messages import read_task_message
from calhook.settings import Settings
from calhook.store.keys import DEAD as DEAD_INDEX
from calhook.store.keys import (
    DISPATCH_PAIR,
    DUE,
    OPEN_STATES,
    body_key,
    event_key,
    pairs_key,
    record_key,
)
from calhook.store.keys import PARKED as PARKED_INDEX
from calhook.store.pairs import Ending, PairStore, Route
from calhook.store.queues import throughput_key
from calhook.store.records import DEAD, PARKED, RecordStore
from ingest import create_app
from tests.conftest import FIXTURES, SECRET, Client
from tests.support.cli import calhook
from tests.support.recording import FAILING_TYPE, RETRY_LATER_TYPE
from tests.support.store import OWNER, accept, dead_letter, end, park, route, start
from tests.support.waiting import await_for
from tests.support.worker import WorkerProcess
from workers.forget import forget_customer
from workers.notify.chat import posted_key
from workers.notify.mail import SentLog
from workers.ordering import UPDATE, Version

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
    """JSON with every kombu message body decoded in place (base64, or JSON in a string)."""
    if isinstance(value, dict):
        props = value.get("properties")
        if isinstance(props, dict) and isinstance(value.get("body"), str):
            body = value["body"]
            if props.get("body_encoding") == "base64":
                body = base64.b64decode(body)
            value = {**value, "body": json.loads(body)}
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def readable(raw: bytes) -> str:
    """A stored value as text a person could read: JSON (and task messages) decoded, also
    after up to three lines of header (as in an event record), in lower case."""
    text = raw.decode("utf-8", "replace")
    cut = 0
    for _ in range(4):
        try:
            value = json.loads(text[cut:])
        except ValueError:
            cut = text.find("\n", cut) + 1
            if not cut:
                break
            continue
        return (text[:cut] + json.dumps(_unwrap(value), ensure_ascii=False)).lower()
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
        elif kind == "stream":
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(key)  # type: ignore[assignment]
            items = [part for _, fields in entries for pair in fields.items() for part in pair]
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


def open_pairs(client: redis.Redis) -> Counter[tuple[str, str]]:
    """How many pairs are queued, running or waiting, by (state, queue)."""
    found: Counter[tuple[str, str]] = Counter()
    for state in OPEN_STATES:
        raw: dict[bytes, bytes] = client.hgetall(pairs_key(state))  # type: ignore[assignment]
        found.update({(state, q.decode()): int(n) for q, n in raw.items() if int(n)})
    return found


def named_in_messages(client: redis.Redis, queues: list[str]) -> set[str]:
    """Every event id the task messages on ``queues`` and in kombu's unacked hash name."""
    raw: list[bytes] = []
    for queue in queues:
        raw += client.lrange(queue, 0, -1)  # type: ignore[arg-type]
    unacked: list[bytes] = client.hvals("unacked")  # type: ignore[assignment]
    raw += [json.dumps(json.loads(entry)[0]).encode() for entry in unacked]
    return {str(i) for m in raw for i in read_task_message(m)[2]["ids"]}


# Every store, filled through the real transitions -------------------------------------------


@pytest.fixture
async def quiet_ingress(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], quiet_url: str
) -> Client:
    return await aiohttp_client(create_app(make_settings(redis_url=quiet_url)))


def done_in_order(pairs: PairStore, person: Person) -> str:
    """An appointment event handled long ago by two ordered handlers: only the versions they
    applied (of the customer, of the appointment) still name the customer. Its id."""
    body = payload("appointment.updated.nested.json", person).encode()
    event_id = accept(pairs, body, event_type="appointment.updated")
    handlers = [
        ("crm.sync_customer", "crm", f"crm:customer:{person['uuid']}"),
        ("appointment_log", "record", f"appointment_log:appointment:{person['appointment']}"),
    ]
    version = Version("", int(time.time()), UPDATE, event_id).encode()
    assert start(pairs, DISPATCH_PAIR, [event_id], "dispatch") == ["run"]
    received = json.dumps({"at": time.time(), "what": "received", "type": "appointment.updated"})
    decision = Route(
        event_id,
        "appointment.updated",
        received.encode(),
        [(name, queue, entity, version) for name, queue, entity in handlers],
    )
    assert pairs.fan_out(throughput_key("dispatch"), 1, [decision]) == ["ok"]
    for name, queue, _ in handlers:
        assert end(pairs, name, queue, Ending(event_id, "done", "ok")) == "ok"
    assert not pairs.client.exists(body_key(event_id))  # handled: the body is gone
    return event_id


async def fill(client: Client, pairs: PairStore, url: str, person: Person) -> dict[str, str]:
    """Put ``person`` in every store calhook keeps; the ids of the events, by what they are."""
    db = pairs.client
    ids: dict[str, str] = {}
    # Queued for dispatch, with their dedup keys, as the ingress writes them.
    for name, fixture in (
        ("created", "customer.created.nested.json"),
        ("booked", "appointment.booking.created.flat.json"),
    ):
        response = await client.post(
            "/webhooks/calenso", data=payload(fixture, person), headers=AUTH
        )
        assert response.status == 202, await response.text()
        ids[name] = (await response.json())["event_id"]

    def accepted(fixture: str, event_type: str) -> str:
        return accept(pairs, payload(fixture, person).encode(), event_type=event_type)

    # A handler's pair queued, its message waiting on its queue.
    ids["crm"] = accepted("customer.updated.nested.json", "customer.updated")
    route(pairs, ids["crm"], [("crm.sync_customer", "crm")])
    # A retry due in an hour.
    ids["retry"] = accepted("appointment.updated.nested.json", "appointment.updated")
    route(pairs, ids["retry"], [("notify.mail", "notify")])
    retry = Ending(
        ids["retry"],
        "retry",
        "retry_scheduled",
        {"error": "SmtpUnavailable"},
        delay_s=3600,
        error="SmtpUnavailable: 451",
    )
    assert end(pairs, "notify.mail", "notify", retry) == "ok"
    # A pair a worker took and is running: kombu holds its message as unacked.
    ids["taken"] = accepted(
        "appointment.booking.cancelled.flat.json", "appointment.booking.cancelled"
    )
    route(pairs, ids["taken"], [("notify.chat", "taken")])
    with Connection(url) as conn:
        channel: Any = conn.default_channel  # kombu's Redis channel
        assert channel.basic_get("taken", no_ack=False) is not None
        channel.qos._delivered.clear()  # a worker that died holding it: nothing to restore
    assert start(pairs, "notify.chat", [ids["taken"]], "taken") == ["run"]
    # Parked (a type nobody knows), and a dead letter, with their trails and a recent failure.
    merged = payload("customer.updated.flat.json", person).replace(
        "customer.updated", "customer.merged"
    )
    ids["parked"] = accept(pairs, merged.encode(), event_type="customer.merged")
    park(pairs, ids["parked"], "unknown_type", event_type="customer.merged")
    ids["dead"] = accepted("customer.updated.nested.json", "customer.updated")
    dead_letter(pairs, ids["dead"], "crm.sync_customer", "crm", error="PermanentError: 400")
    # Events handled long ago: only the order versions name the customer, and they name the
    # last one; a final pair keeps no entity, so the one before holds nothing of hers (its
    # state and trail carry no personal data, and forget need not find it).
    ids["done_before"] = done_in_order(pairs, person)
    ids["done"] = done_in_order(pairs, person)
    # Notification marks of the taken pair and of the retry.
    async with redis.asyncio.Redis.from_url(url) as adb:
        await SentLog(adb, f"{ids['taken']}:notify.chat").add("ops@example.com")
    db.set(posted_key(f"{ids['retry']}:notify.mail"), 1)
    return ids


QUEUES = ["dispatch", "crm", "notify", "taken", "record"]


async def test_forget_erases_one_customer_from_every_store(
    quiet_ingress: Client, quiet_pairs: PairStore, quiet_db: redis.Redis, quiet_url: str
) -> None:
    # Given: two customers in every store.
    luca = await fill(quiet_ingress, quiet_pairs, quiet_url, LUCA)
    anna = await fill(quiet_ingress, quiet_pairs, quiet_url, ANNA)
    stores_of_anna = holding(quiet_db, ANNA["uuid"])
    assert holding(quiet_db, LUCA["uuid"]) != []
    open_before = open_pairs(quiet_db)

    # When one is forgotten.
    report = json.loads(calhook(quiet_url, "forget", LUCA["uuid"].upper(), "--json"))

    # Then: nothing of hers is left anywhere, and all of the other is.
    assert_gone(quiet_db, LUCA)
    for value in personal_data(ANNA):
        assert holding(quiet_db, value) != [], value
    assert holding(quiet_db, ANNA["uuid"]) == stores_of_anna
    assert report["customer_uuid"] == LUCA["uuid"]
    found = {name: event_id for name, event_id in luca.items() if name != "done_before"}
    assert report["removed"] == {
        "events": 8,
        "open_work": 5,  # two dispatches, the crm pair, the retry, the taken pair
        "records": 2,  # the parked event, the dead letter
        "ordering": 2,  # the customer and the appointment
        "dedup": 8,
        "notify_marks": 2,
        "recent_failures": 2,  # the retry, the dead letter
    }
    assert report["work_dropped"] == 5
    assert sorted(report["event_ids"]) == sorted(found.values())
    for event_id in found.values():
        assert quiet_db.exists(event_key(event_id), body_key(event_id), trail_key(event_id)) == 0
        assert quiet_pairs.states(event_id) == {}
    assert RecordStore(quiet_db, PARKED).ids() == [anna["parked"]]
    assert RecordStore(quiet_db, DEAD).ids() == [f"{anna['dead']}.crm.sync_customer"]
    # Her open work is out of the counts and of the sweep, and the other's is all there.
    assert open_pairs(quiet_db) == Counter({k: n // 2 for k, n in open_before.items()})
    due: list[bytes] = quiet_db.zrange(DUE, 0, -1)  # type: ignore[assignment]
    swept = {m.decode().partition("/")[0] for m in due}
    assert swept == {anna[k] for k in ("created", "booked", "crm", "retry", "taken")}

    # A message that still names her events runs nothing, and no sweep queues them again.
    assert named_in_messages(quiet_db, QUEUES) >= {luca[k] for k in ("created", "crm", "taken")}
    for pair, queue, name in (
        (DISPATCH_PAIR, "dispatch", "created"),
        ("crm.sync_customer", "crm", "crm"),
        ("notify.mail", "notify", "retry"),
        ("notify.chat", "taken", "taken"),
    ):
        ran = quiet_pairs.start(
            pair, [luca[name]], OWNER, max_starts=5, seq=None, queue=queue, defer_s=1.0
        )
        assert [s.what for s in ran] == ["gone"], name
    before_sweep = named_in_messages(quiet_db, QUEUES)
    later = quiet_pairs.sweep(limit=1000, batch_max=10, now_s=time.time() + 7200)
    assert not {m.partition("/")[0] for m in later.recovered} & set(luca.values())
    assert not (named_in_messages(quiet_db, QUEUES) - before_sweep) & set(luca.values())

    # A second run finds nothing; the other customer goes with a readable report.
    again = json.loads(calhook(quiet_url, "forget", LUCA["uuid"], "--json"))
    text = calhook(quiet_url, "forget", ANNA["uuid"])

    assert again["total"] == 0
    assert_gone(quiet_db, ANNA)
    assert open_pairs(quiet_db) == Counter()
    assert f"customer {ANNA['uuid']}: 29 items removed, from 8 events" in text
    assert "5 open pair(s) were erased" in text
    for value in personal_data(ANNA)[1:]:
        assert value not in text.lower()


def test_forget_refuses_what_is_not_a_uuid(redis_url: str, redis_db: redis.Redis) -> None:
    for wrong in ("", "1", "luca.brunner@example.org"):
        with pytest.raises(subprocess.CalledProcessError) as failed:
            calhook(redis_url, "forget", wrong)
        assert "is not a customer uuid" in failed.value.stderr


def test_a_dead_letter_whose_error_names_the_customer_goes_too(
    quiet_pairs: PairStore, quiet_db: redis.Redis
) -> None:
    # Given: a dead letter whose body does not name the customer, but whose error text does.
    event_id = accept(quiet_pairs, b'{"type": "x", "data": {}}')
    error = f"PermanentError: the CRM refused customer {LUCA['uuid']}"
    dead_letter(quiet_pairs, event_id, "crm.sync_customer", "crm", error=error)
    other = accept(quiet_pairs, b'{"type": "x", "data": {}}')
    dead_letter(
        quiet_pairs, other, "crm.sync_customer", "crm", error=f"PermanentError: {ANNA['uuid']}"
    )

    # When the customer is forgotten.
    report = forget_customer(quiet_pairs, LUCA["uuid"])

    # Then: the dead letter, its event and its body are gone; the other's stays.
    assert report.event_ids == (event_id,)
    assert report.removed["records"] == 1
    assert holding(quiet_db, LUCA["uuid"]) == []
    assert not quiet_db.exists(record_key(DEAD_INDEX, f"{event_id}.crm.sync_customer"))
    assert quiet_db.exists(event_key(event_id), body_key(event_id)) == 0
    assert RecordStore(quiet_db, DEAD).ids() == [f"{other}.crm.sync_customer"]


# Through the real pipeline --------------------------------------------------------------------


async def post(client: Client, event_type: str, person: Person) -> str:
    customer = json.loads(payload("customer.created.nested.json", person))["data"]["customer"]
    body = {"type": event_type, "created": "2025-06-01 12:00:00",
            "data": {"customer": customer, "after_s": 600}}  # fmt: skip
    response = await client.post("/webhooks/calenso", data=json.dumps(body), headers=AUTH)
    assert response.status == 202, await response.text()
    return str((await response.json())["event_id"])


async def test_forget_after_the_real_pipeline(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis, redis_url: str, pairs: PairStore
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

    def state(event_id: str, pair: str) -> tuple[str, int] | None:
        found = pairs.states(event_id).get(pair)
        return (found.state, found.attempt) if found else None

    def settled() -> bool:
        return all(
            redis_db.exists(record_key(DEAD_INDEX, f"{i['dead']}.explode"))
            and redis_db.exists(record_key(PARKED_INDEX, i["parked"]))
            and state(i["retry"], "retry_later") == ("waiting", 2)
            and state(i["done"], "fake_crm") == ("done", 1)
            for i in ids.values()
        )

    await await_for(settled, timeout_s=60, what="dead letters, parked events, retries")

    report = json.loads(calhook(redis_url, "forget", LUCA["uuid"], "--json"))

    assert_gone(redis_db, LUCA)
    for value in personal_data(ANNA):
        assert holding(redis_db, value) != [], value
    removed = report["removed"]
    assert removed["records"] == 2  # the parked event, the dead letter
    assert removed["open_work"] >= 1  # the retry
    assert removed["ordering"] >= 1  # fake_crm's version of the customer
    assert set(ids["luca"].values()) <= set(report["event_ids"])
    assert state(ids["luca"]["retry"], "retry_later") is None
    assert state(ids["anna"]["retry"], "retry_later") == ("waiting", 2)
    assert not redis_db.exists(trail_key(ids["luca"]["done"]))
    assert redis_db.exists(trail_key(ids["anna"]["done"]))
