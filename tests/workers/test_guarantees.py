"""Delivery guarantees with a real worker and scheduler: retries on a (compressed) schedule,
dead letters and replay, a pair that ran never runs again, the poison cap and order per entity."""

from __future__ import annotations

import json
from typing import Any

import orjson
import redis

from calhook.constants import HANDLER_TASK
from calhook.messages import task_message
from tests.conftest import FIXTURES, SECRET, Client
from tests.support.cli import calhook
from tests.support.recording import (
    APPOINTMENT_LOG_KEY,
    EFFECTS_KEY,
    FAILING_TYPE,
    FIXED_KEY,
    FLAKY_TYPE,
    PERMANENT_TYPE,
    POISON_TYPE,
    RECORD_QUEUE,
    RETRY_LATER_TYPE,
    RUNS_KEY,
    crm_key,
)
from tests.support.waiting import await_for
from tests.support.worker import WorkerProcess

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}


async def post(client: Client, event_type: str, data: dict[str, Any], created: str = "") -> str:
    body = {"type": event_type, "created": created or "2025-05-01 10:00:00", "data": data}
    response = await client.post("/webhooks/calenso", data=orjson.dumps(body), headers=AUTH)
    assert response.status == 202, await response.text()
    return str((await response.json())["event_id"])


def count(redis_db: redis.Redis, key: str, event_id: str, handler: str) -> int:
    return int(redis_db.hget(key, f"{event_id}:{handler}") or 0)


FINAL = (b"done", b"stale", b"dead")


def state(redis_db: redis.Redis, event_id: str, handler: str) -> bytes | None:
    """The pair's state as stored (``calhook/store/lua``)."""
    return redis_db.hget(f"calhook:ev:{event_id}", f"{handler}/s")  # type: ignore[return-value]


def outcomes(worker: WorkerProcess, event_id: str) -> list[str]:
    return [
        str(line["outcome"])
        for line in worker.lines()
        if line.get("event_id") == event_id and "outcome" in line
    ]


async def test_a_handler_failing_three_times_completes_on_schedule(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    event_id = await post(client, FLAKY_TYPE, {"fail_times": 3})

    await await_for(lambda: count(redis_db, EFFECTS_KEY, event_id, "flaky") == 1, what="success")

    assert count(redis_db, RUNS_KEY, event_id, "flaky") == 4
    assert outcomes(worker, event_id) == ["retry_scheduled"] * 3 + ["ok"]
    delays = [
        ln["retry_in_s"] for ln in worker.lines() if ln.get("event_id") == event_id
        and ln.get("outcome") == "retry_scheduled"
    ]  # fmt: skip
    assert delays == [0.1, 0.2, 0.3]
    assert state(redis_db, event_id, "flaky") == b"done"


async def test_a_reported_retry_after_sets_the_next_attempt(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    event_id = await post(client, RETRY_LATER_TYPE, {"after_s": 0.7})

    await await_for(lambda: count(redis_db, EFFECTS_KEY, event_id, "retry_later") == 1)

    [scheduled] = [
        ln for ln in worker.lines()
        if ln.get("event_id") == event_id and ln.get("outcome") == "retry_scheduled"
    ]  # fmt: skip
    assert scheduled["retry_in_s"] == 0.7  # not the schedule's 0.1
    assert scheduled["error"] == "RetryLater"


async def test_a_handler_that_never_succeeds_ends_in_the_dead_letter_store(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    event_id = await post(client, FAILING_TYPE, {})

    await await_for(lambda: redis_db.exists(f"calhook:dead:{event_id}.explode"), what="dead")

    record = redis_db.hgetall(f"calhook:dead:{event_id}.explode")
    assert record[b"reason"] == b"exhausted"
    assert record[b"attempts"] == b"4"
    assert record[b"error"] == b"RuntimeError: this handler always fails"
    assert b"raise RuntimeError" in record[b"traceback"]
    assert count(redis_db, RUNS_KEY, event_id, "explode") == 4
    assert state(redis_db, event_id, "explode") == b"dead"


async def test_a_permanent_error_skips_the_schedule_and_replay_after_the_fix_completes(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis, redis_url: str
) -> None:
    event_id = await post(client, PERMANENT_TYPE, {})
    dead_id = f"{event_id}.permanent"
    await await_for(lambda: redis_db.exists(f"calhook:dead:{dead_id}"), what="dead")
    assert redis_db.hget(f"calhook:dead:{dead_id}", "reason") == b"permanent"
    assert count(redis_db, RUNS_KEY, event_id, "permanent") == 1
    assert dead_id in calhook(redis_url, "dlq", "list")
    listed = json.loads(calhook(redis_url, "dlq", "list", "--handler", "permanent", "--json"))
    assert listed["count"] == 1
    [record] = listed["records"]
    assert (record["id"], record["reason"]) == (dead_id, "permanent")
    assert "body" not in record  # a list never prints bodies; `dlq show` does

    redis_db.set(FIXED_KEY, 1)
    replayed = calhook(redis_url, "dlq", "replay", "--handler", "permanent")

    assert "1 replayed" in replayed
    await await_for(lambda: count(redis_db, EFFECTS_KEY, event_id, "permanent") == 1)
    assert not redis_db.exists(f"calhook:dead:{dead_id}")
    assert state(redis_db, event_id, "permanent") == b"done"
    assert "0 dead letters" in calhook(redis_url, "dlq", "list")


async def test_a_message_that_kills_its_worker_is_dead_lettered_after_the_cap(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    event_id = await post(client, POISON_TYPE, {})

    await await_for(
        lambda: redis_db.exists(f"calhook:dead:{event_id}.poison"), timeout_s=60, what="dead"
    )

    record = redis_db.hgetall(f"calhook:dead:{event_id}.poison")
    assert record[b"reason"] == b"poison"
    # CALHOOK_MAX_DELIVERIES=3 in the tests: three runs killed the child, the fourth was refused.
    assert count(redis_db, RUNS_KEY, event_id, "poison") == 3


async def test_a_redelivered_message_whose_pair_finished_does_not_run_again(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    event_id = await post(
        client,
        "lead.created",
        json.loads((FIXTURES / "lead.created.nested.json").read_text())["data"],
    )
    await await_for(lambda: state(redis_db, event_id, "record") == b"done", what="done")
    copy = task_message(
        HANDLER_TASK, queue=RECORD_QUEUE, kwargs={"ids": [event_id], "handler": "record"}
    )

    redis_db.lpush(RECORD_QUEUE, copy)  # as Redis would after a lost ack

    def not_run() -> bool:
        return any(
            ln.get("msg") == "not run" and ln.get("event_id") == event_id for ln in worker.lines()
        )

    await await_for(not_run, what="the copy to be taken and found finished")
    assert count(redis_db, RUNS_KEY, event_id, "record") == 1
    assert state(redis_db, event_id, "record") == b"done"


def customer(last_name: str, uuid: str = "c0ffee00-0000-4000-8000-000000000001") -> dict[str, Any]:
    return {"customer": {"uuid": uuid, "last_name": last_name, "lastname": last_name}}


async def settle(redis_db: redis.Redis, worker: WorkerProcess, event_id: str) -> None:
    await await_for(
        lambda: state(redis_db, event_id, "fake_crm") in FINAL,
        what="the fake CRM handler to finish",
    )


async def test_late_older_customer_events_never_overwrite_newer_state(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    crm = crm_key("c0ffee00-0000-4000-8000-000000000001")

    async def send(event_type: str, name: str, created: str) -> str:
        event_id = await post(client, event_type, customer(name), created)
        await settle(redis_db, worker, event_id)
        return event_id

    await send("customer.created", "Created", "2025-05-01 10:00:00")
    await send("customer.updated", "Newer", "2025-05-01 10:05:00")
    stale = await send("customer.updated", "Older", "2025-05-01 10:02:00")
    assert redis_db.hget(crm, "last_name") == b"Newer"
    assert state(redis_db, stale, "fake_crm") == b"stale"

    await send("customer.deleted", "Newer", "2025-05-01 10:10:00")
    await send("customer.updated", "Resurrected?", "2025-05-01 10:20:00")  # newer, but an update
    await send("customer.updated", "Older", "2025-05-01 10:03:00")
    assert redis_db.hget(crm, "deleted") == b"1"

    await send("customer.created", "Back", "2025-05-01 10:30:00")
    assert redis_db.hgetall(crm)[b"deleted"] == b"0"
    assert redis_db.hget(crm, "last_name") == b"Back"


async def test_in_the_same_second_an_update_beats_a_create_whatever_the_arrival(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    uuid = "c0ffee00-0000-4000-8000-000000000002"
    crm = crm_key(uuid)

    update = await post(
        client, "customer.updated", customer("Updated", uuid), "2025-05-02 08:00:00"
    )
    await settle(redis_db, worker, update)
    create = await post(
        client, "customer.created", customer("Created", uuid), "2025-05-02 08:00:00"
    )
    await settle(redis_db, worker, create)

    assert redis_db.hget(crm, "last_name") == b"Updated"
    assert state(redis_db, create, "fake_crm") == b"stale"


async def test_a_parked_event_replays_through_dispatch(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis, redis_url: str
) -> None:
    # A payload that fails its schema is parked; once "fixed" (here: the record's reason is
    # all that replay looks at), replay runs dispatch again, which parks it again, once.
    response = await client.post(
        "/webhooks/calenso",
        data=orjson.dumps(
            {
                "type": "customer.created",
                "created": "2025-05-01 10:00:00",
                "data": {"customer": "not an object"},
            }
        ),
        headers=AUTH,
    )
    event_id = str((await response.json())["event_id"])
    await await_for(lambda: redis_db.zscore("calhook:parked", event_id) is not None)
    assert event_id in calhook(redis_url, "parked", "list")
    listed = json.loads(
        calhook(redis_url, "parked", "list", "--reason", "schema_invalid", "--json")
    )
    assert [r["id"] for r in listed["records"]] == [event_id]
    assert "body" not in listed["records"][0]

    assert "1 replayed" in calhook(redis_url, "parked", "replay", "--reason", "schema_invalid")

    await await_for(lambda: state(redis_db, event_id, "@dispatch") == b"parked")
    trail = [orjson.loads(e)["what"] for e in redis_db.lrange(f"calhook:trail:{event_id}", 0, -1)]
    assert trail.count("parked") == 2
    assert trail.count("replayed") == 1
    assert redis_db.zcard("calhook:parked") == 1
    assert redis_db.exists(f"calhook:body:{event_id}")


async def test_a_cancelled_appointment_is_not_revived_by_a_late_update(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    sample = json.loads((FIXTURES / "appointment.booking.created.nested.json").read_text())
    data = sample["data"]
    data["appointment"]["uuid"] = "a0000000-0000-4000-8000-00000000a001"

    async def send(event_type: str, created: str) -> str:
        event_id = await post(client, event_type, data, created)
        await await_for(lambda: state(redis_db, event_id, "appointment_log") in FINAL)
        return event_id

    await send("appointment.booking.created", "2025-05-03 09:00:00")
    await send("appointment.booking.cancelled", "2025-05-03 09:30:00")
    late = await send("appointment.updated", "2025-05-03 09:10:00")
    newer_update = await send("appointment.updated", "2025-05-03 10:00:00")

    applied: list[bytes] = redis_db.lrange(APPOINTMENT_LOG_KEY, 0, -1)  # type: ignore[assignment]
    assert applied == [b"appointment.booking.created", b"appointment.booking.cancelled"]
    for skipped in (late, newer_update):
        assert state(redis_db, skipped, "appointment_log") == b"stale"
