"""``calhook queues``: what waits, runs, is delayed or failed, per queue, from Redis alone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis

from calhook.ids import new_event_id
from calhook.messages import event_record, task_message
from calhook.redis_server import RedisServer
from calhook.settings import Settings
from calhook.store.connect import pair_store
from calhook.store.keys import dedup_key
from calhook.store.pairs import Ending, PairStore
from tests.support.cli import calhook
from tests.support.store import accept, dead_letter, end, park, route, start


def calhook_queues(redis_url: str, *args: str) -> str:
    return calhook(redis_url, "queues", *args)


@pytest.fixture
def quiet_redis(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> Iterator[tuple[redis.Redis, str, PairStore]]:
    """A Redis of its own: the session's worker must not drain what this test lays out."""
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        yield client, server.url, pair_store(client, make_settings())
        client.close()


def accept_batch(pairs: PairStore, ages_s: list[int]) -> None:
    """One ingress batch: one dispatch message naming every event, received ``ages_s`` ago."""
    now = time.time()
    batch = []
    for age_s in ages_s:
        event_id = new_event_id()
        record = event_record("default", now - age_s, "customer.created", b"{}")
        batch.append((dedup_key(event_id), event_id, record))
    assert pairs.accept(batch) == [None] * len(ages_s)


def test_every_kind_of_pending_work_is_counted_with_no_worker_running(
    quiet_redis: tuple[redis.Redis, str, PairStore],
) -> None:
    # Given, on a Redis no worker consumes, pairs in every state, reached by the real
    # transitions: three events of one batch (one message) waiting for dispatch, the oldest
    # 100 s ago; on crm one pair waiting for its retry, one running and one dead letter; one
    # parked event; five audit pairs done; two audit messages a worker took and has not acked
    redis_db, redis_url, pairs = quiet_redis
    accept_batch(pairs, [100, 50, 10])
    retried, running, dead, parked = (accept(pairs) for _ in range(4))
    for event_id in (retried, running):
        route(pairs, event_id, [("crm.sync", "crm")])
    retry = Ending(retried, "retry", "retry_scheduled", delay_s=60)
    assert end(pairs, "crm.sync", "crm", retry) == "ok"
    assert start(pairs, "crm.sync", [running], "crm") == ["run"]
    dead_letter(pairs, dead, "crm.sync", "crm")
    park(pairs, parked)
    for _ in range(5):
        audited = accept(pairs)
        route(pairs, audited, [("audit", "audit")])
        assert end(pairs, "audit", "audit", Ending(audited, "done", "ok")) == "ok"
    for tag in ("t1", "t2"):  # what kombu keeps for messages a worker took and has not acked
        raw = orjson.loads(task_message("calhook.handle", queue="audit"))
        redis_db.hset("unacked", tag, orjson.dumps([raw, "", "audit"]))

    # When an operator asks
    rows = {row["queue"]: row for row in json.loads(calhook_queues(redis_url, "--json"))}

    # Then each is counted once, in pairs, on its queue
    assert {"dispatch", "audit", "crm"} <= set(rows)
    dispatch, audit, crm = rows["dispatch"], rows["audit"], rows["crm"]
    assert (dispatch["ready"], dispatch["running"], dispatch["parked"]) == (3, 0, 1)
    assert 99 <= dispatch["oldest_age_s"] < 130
    assert dispatch["done_last_min"] == 9  # every event dispatch routed or parked
    assert (audit["ready"], audit["running"], audit["unacked"]) == (0, 0, 2)
    assert audit["done_last_min"] == 5
    assert (crm["ready"], crm["running"], crm["delayed"], crm["dead"]) == (0, 1, 1, 1)

    table = calhook_queues(redis_url)
    header, *lines = table.splitlines()
    assert header.split() == [
        "queue", "ready", "running", "unacked", "delayed", "held", "dead", "parked", "oldest",
        "held-for", "done/min"
    ]  # fmt: skip
    [dispatch_line] = [line.split() for line in lines if line.startswith("dispatch")]
    assert dispatch_line[:8] == ["dispatch", "3", "0", "0", "0", "0", "0", "1"]
    assert dispatch_line[8].endswith("s")
    assert 99 <= int(dispatch_line[8][:-1]) < 130
    assert dispatch_line[9:] == ["-", "9"]
