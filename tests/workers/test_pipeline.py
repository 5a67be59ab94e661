"""End to end: the real ingress app → real Redis → a real `calhook worker` process.

Given every Calenso sample, nested and flat, posted over HTTP, then each is dispatched and each of
its handlers runs exactly once with the right canonical view; what cannot be routed is parked,
what fails is dead-lettered, nothing is dropped.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import redis

from calhook.constants import DISPATCH_QUEUE, DISPATCH_TASK
from calhook.messages import task_message
from calhook.store.keys import DISPATCH_PAIR, DUE, body_key, event_key
from calhook.store.pairs import PairStore
from calhook.store.records import PARKED, RecordStore
from schemas import CURRENT_TYPES, PLANNED_TYPES
from tests.conftest import FIXTURES, SECRET, Client, fixture_files, queues_drained
from tests.support.recording import RUNS_KEY, VIEWS_KEY
from tests.support.store import accept
from tests.support.waiting import await_for, wait_for
from tests.support.worker import WorkerProcess

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
APPOINTMENT_LOG_TYPES = {
    "appointment.booking.created",
    "appointment.updated",
    "appointment.booking.cancelled",
}
# The samples of one customer are not in time order, so the ordered handlers skip some.
FINISHED = ("handler done", "skipped stale")


async def post(client: Client, body: bytes) -> str:
    response = await client.post("/webhooks/calenso", data=body, headers=AUTH)
    assert response.status == 202, await response.text()
    return str((await response.json())["event_id"])


def expected_view(fixture: Path) -> dict[str, Any]:
    """What the canonical view must say, read from the nested sample of the same event."""
    nested = fixture.with_name(fixture.name.replace(".flat.", ".nested."))
    body = json.loads(nested.read_text())
    data = body["data"]
    customer = data.get("customer") or data.get("appointment", {}).get("customer")
    start = (data.get("appointment") or data.get("event_slot") or {}).get("start_utc")
    return {
        "type": body["type"],
        "customer_uuid": customer["uuid"] if customer and "lead" not in data else None,
        "customer_email": customer["email"] if customer and "lead" not in data else None,
        "start_utc": dt.datetime.fromisoformat(start).replace(tzinfo=dt.UTC) if start else None,
        "shape": "flat" if ".flat." in fixture.name else "nested",
    }


def seen_view(view: dict[str, Any]) -> dict[str, Any]:
    thing = view.get("appointment") or view.get("slot") or {}
    start = thing.get("start_utc")
    return {
        "type": view["type"],
        "customer_uuid": (view.get("customer") or {}).get("uuid"),
        "customer_email": (view.get("customer") or {}).get("email"),
        "start_utc": dt.datetime.fromisoformat(start) if start else None,
        "shape": view["shape"],
    }


def handlers_of(event_type: str) -> list[str]:
    """The handlers the session's worker runs for a type, sorted (tests/conftest.py)."""
    names = []
    if event_type in CURRENT_TYPES:
        names += ["audit", "record"]
    if event_type.startswith("customer."):
        names += ["fake_crm", "crm.sync_customer"]
    if event_type in APPOINTMENT_LOG_TYPES:
        names.append("appointment_log")
    if event_type.startswith(("appointment.", "event.")) and event_type in CURRENT_TYPES:
        names.append("crm.sync_booking_customer")
    if event_type == "lead.created":
        names.append("crm.sync_lead")
    if (
        event_type.endswith((".cancelled", ".payment_failed"))
        or event_type == "appointment.updated"
    ):
        names += ["notify.chat", "notify.email"]
    return sorted(names)


def runs(redis_db: redis.Redis) -> Counter[str]:
    raw: dict[bytes, bytes] = redis_db.hgetall(RUNS_KEY)  # type: ignore[assignment]
    return Counter({k.decode(): int(v) for k, v in raw.items()})


def handler_lines(worker: WorkerProcess, event_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in worker.lines()
        if line.get("event_id") == event_id and line.get("msg") in {*FINISHED, "audit"}
    ]


async def test_every_sample_is_dispatched_and_handled_exactly_once(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis, pairs: PairStore
) -> None:
    posted = {path: await post(client, path.read_bytes()) for path in fixture_files()}
    types = {path: json.loads(path.read_text())["type"] for path in posted}
    handled = {p: e for p, e in posted.items() if handlers_of(types[p])}
    parked = {p: e for p, e in posted.items() if p not in handled}
    current = {p: e for p, e in posted.items() if types[p] in CURRENT_TYPES}
    assert (len(handled), len(current), len(parked)) == (20, 18, 4)
    expected = {e: handlers_of(types[p]) for p, e in handled.items()}

    def finished() -> bool:
        done = Counter(line["event_id"] for line in worker.lines() if line.get("msg") in FINISHED)
        return (
            all(done[e] >= len(names) for e, names in expected.items())
            and redis_db.zcard("calhook:parked") == len(parked)
            and queues_drained(redis_db)
        )

    await await_for(finished, what="every sample handled or parked")

    assert set(runs(redis_db).values()) == {1}
    # Every pair is final, so the scheduler has nothing left to watch or queue again.
    await await_for(lambda: redis_db.zcard(DUE) == 0, what="no open pair")
    for path, event_id in handled.items():
        states = {name: p.state for name, p in pairs.states(event_id).items()}
        assert states.pop(DISPATCH_PAIR) == "done", path.name
        assert sorted(states) == expected[event_id], path.name
        assert set(states.values()) <= {"done", "stale"}, path.name
        assert not redis_db.exists(body_key(event_id)), f"{path.name}: body kept after the end"
    record_runs = [pair for pair in runs(redis_db) if pair.endswith(":record")]
    assert sorted(record_runs) == sorted(f"{e}:record" for e in current.values())
    for path, event_id in current.items():
        view = orjson.loads(redis_db.hget(VIEWS_KEY, event_id))  # type: ignore[arg-type]
        assert seen_view(view) == expected_view(path), path.name
    for path, event_id in handled.items():
        done = [ln["handler"] for ln in handler_lines(worker, event_id) if ln["msg"] in FINISHED]
        assert sorted(done) == expected[event_id], path.name
    parked_records = RecordStore(redis_db, PARKED)
    for path, event_id in parked.items():
        assert {n: p.state for n, p in pairs.states(event_id).items()} == {DISPATCH_PAIR: "parked"}
        record = parked_records.get(event_id)
        assert record is not None, path.name
        assert record["reason"] == "planned_type_without_handler", path.name
        assert record["type"] in PLANNED_TYPES
        assert record["body"].encode() == path.read_bytes()  # kept once, for replay


async def test_audit_line_masks_personal_data(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    sample = fixture_files()[0]  # appointment.booking.cancelled.flat.json
    event_id = await post(client, sample.read_bytes())
    await await_for(lambda: f"{event_id}:record" in runs(redis_db), what="the event handled")

    [audit] = wait_for(
        lambda: [ln for ln in handler_lines(worker, event_id) if ln["msg"] == "audit"],
        what="the audit line",
    )
    assert audit["handler"] == "audit"
    assert audit["type"] == "appointment.booking.cancelled"
    assert audit["customer_uuid"] == "c3a9e5d2-41b7-4f0e-8c2d-6e1f0a9b7d34"
    assert audit["email"] == "l***@e***.org"
    assert audit["phone"] == "+41*******42"
    assert audit["starts_at"] == "2025-03-20T13:00:00+00:00"
    log_text = worker.log_path.read_text()
    for personal in ("luca.brunner@example.org", "+41790000142", "Brunner", "Musterweg"):
        assert personal not in log_text


async def test_unknown_type_and_invalid_payload_are_parked_with_the_reason(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    unknown = await post(
        client, orjson.dumps({"type": "invoice.paid", "created": "2025-01-01 00:00:00", "data": {}})
    )
    invalid = await post(
        client,
        orjson.dumps(
            {
                "type": "customer.created",
                "created": "2025-01-01 00:00:00",
                "data": {"customer": {"email": "anna.muster@example.org"}},
            }
        ),
    )

    await await_for(lambda: redis_db.zcard("calhook:parked") == 2, what="both parked")

    assert redis_db.hget(f"calhook:parked:{unknown}", "reason") == b"unknown_type"
    record = redis_db.hgetall(f"calhook:parked:{invalid}")
    assert record[b"reason"] == b"schema_invalid"
    errors = orjson.loads(record[b"errors"])
    assert any("uuid" in e["loc"] for e in errors), errors
    assert b"anna.muster" not in record[b"errors"]
    kept = RecordStore(redis_db, PARKED).get(invalid)
    assert kept is not None
    assert "anna.muster" in kept["body"]  # kept for replay, not lost
    assert runs(redis_db) == Counter()


def test_redelivered_dispatch_fans_out_once(
    worker: WorkerProcess, redis_db: redis.Redis, pairs: PairStore
) -> None:
    # Given an accepted event whose dispatch message is delivered three times (kombu restores
    # an unacked message after the visibility timeout, even if its run finished)
    body = (FIXTURES / "customer.created.nested.json").read_bytes()
    event_id = accept(pairs, body)
    # (the message's number on its queue and its delivery tag, as the scripts wrote them)
    fields = (f"{DISPATCH_PAIR}/p", f"{DISPATCH_PAIR}/g")
    raw: list[bytes] = redis_db.hmget(event_key(event_id), fields)  # type: ignore[assignment]
    seq, tag = (value.decode() for value in raw)
    copy = task_message(
        DISPATCH_TASK,
        queue=DISPATCH_QUEUE,
        kwargs={"ids": [event_id], "seq": int(seq)},
        task_id=tag,
    )

    # When both copies reach the worker too, while the first runs or after it finished
    redis_db.lpush(DISPATCH_QUEUE, copy, copy)

    # Then the event is fanned out once and each handler runs once; the copies run nothing
    def messages() -> list[str]:
        return [ln["msg"] for ln in worker.lines() if ln.get("event_id") == event_id]

    handlers = len(handlers_of("customer.created"))

    def settled() -> bool:
        return (
            messages().count("not dispatched") == 2 and messages().count("handler done") == handlers
        )

    wait_for(settled, what="the event handled and both copies refused")
    assert messages().count("dispatched") == 1
    copies = [
        ln["why"]
        for ln in worker.lines()
        if ln.get("event_id") == event_id and ln.get("msg") == "not dispatched"
    ]
    assert set(copies) <= {"busy", "done"}
    assert runs(redis_db)[f"{event_id}:record"] == 1
    assert pairs.states(event_id)[DISPATCH_PAIR].state == "done"
