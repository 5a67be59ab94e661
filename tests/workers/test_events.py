"""``calhook events``: an event's story, from its arrival to each handler's outcome."""

from __future__ import annotations

import json
from typing import Any

import orjson
import redis

from calhook.store.pairs import PairStore
from tests.conftest import SECRET, Client
from tests.support.cli import calhook
from tests.support.recording import FLAKY_TYPE
from tests.support.waiting import await_for
from tests.support.worker import WorkerProcess

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}


async def post(client: Client, event_type: str, data: dict[str, Any]) -> str:
    body = {"type": event_type, "created": "2025-06-01 12:00:00", "data": data}
    response = await client.post("/webhooks/calenso", data=orjson.dumps(body), headers=AUTH)
    return str((await response.json())["event_id"])


def state(pairs: PairStore, event_id: str, handler: str) -> str | None:
    pair = pairs.states(event_id).get(handler)
    return pair.state if pair else None


async def test_the_story_of_a_retried_event(
    client: Client, worker: WorkerProcess, pairs: PairStore, redis_url: str
) -> None:
    event_id = await post(client, FLAKY_TYPE, {"fail_times": 1})
    await await_for(lambda: state(pairs, event_id, "flaky") == "done")

    story = json.loads(calhook(redis_url, "events", "show", event_id, "--json"))

    steps = [
        (e["what"], e.get("handler"), e.get("attempt"), e.get("outcome")) for e in story["entries"]
    ]
    assert steps == [
        ("received", None, None, None),
        ("dispatched", None, None, None),
        ("handler", "flaky", 1, "retry_scheduled"),
        ("handler", "flaky", 2, "ok"),
    ]
    received, _, retried, _ = story["entries"]
    assert (received["type"], received["endpoint"]) == (FLAKY_TYPE, "default")
    assert retried["error"] == "RuntimeError"
    assert retried["retry_in_s"] == 0.1
    # Where each pair stands now: the handler done by its second attempt.
    assert story["states"] == {"dispatch": "done", "flaky": "done"}
    assert story["pairs"]["flaky"]["attempt"] == 2
    text = calhook(redis_url, "events", "show", event_id)
    assert "retry_scheduled" in text
    assert "now: dispatch=done, flaky=done" in text
    listed = calhook(redis_url, "events", "list", "--type", FLAKY_TYPE, "--since", "10m")
    assert event_id in listed
    entries = json.loads(
        calhook(redis_url, "events", "list", "--type", FLAKY_TYPE, "--since", "10m", "--json")
    )
    assert [(e["event_id"], e["type"]) for e in entries] == [(event_id, FLAKY_TYPE)]


async def test_a_parked_event_says_why(
    client: Client, worker: WorkerProcess, redis_db: redis.Redis, redis_url: str
) -> None:
    event_id = await post(client, "invoice.paid", {})
    await await_for(lambda: redis_db.exists(f"calhook:parked:{event_id}"))

    text = calhook(redis_url, "events", "show", event_id)

    assert "received" in text
    assert "parked     reason=unknown_type" in text
