"""``calhook queues``: what waits, runs, is delayed or failed, per queue, from Redis alone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from calhook.messages import Delivery, dispatch_message, task_message
from calhook.redis_server import RedisServer
from tests.support.cli import calhook
from workers.delayed import DelayedStore
from workers.queues import count_finished
from workers.stores import DEAD, PARKED, RecordStore


def calhook_queues(redis_url: str, *args: str) -> str:
    return calhook(redis_url, "queues", *args)


@pytest.fixture
def quiet_redis(tmp_path: Path) -> Iterator[tuple[redis.Redis, str]]:
    """A Redis of its own: the session's worker must not drain what this test lays out."""
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        yield client, server.url
        client.close()


def test_every_kind_of_pending_work_is_counted_with_no_worker_running(
    quiet_redis: tuple[redis.Redis, str],
) -> None:
    redis_db, redis_url = quiet_redis
    now = time.time()
    for age_s in (100, 50, 10):  # the oldest is pushed first, as the ingress would
        delivery = Delivery(f"e-{age_s}", "{}", "default", now - age_s)
        redis_db.lpush("dispatch", dispatch_message(delivery, "customer.created"))
    for tag in ("t1", "t2"):  # what kombu keeps for messages a worker took and has not acked
        raw = orjson.loads(task_message("calhook.handle", queue="audit"))
        redis_db.hset("unacked", tag, orjson.dumps([raw, "", "audit"]))
    DelayedStore(redis_db).schedule("e-1.crm.sync#2", "crm", b"message", now + 60)
    RecordStore(redis_db, DEAD).put("e-2.crm.sync", {"queue": "crm", "handler": "crm.sync"})
    RecordStore(redis_db, PARKED).put("e-3", {"reason": "unknown_type"})
    for _ in range(5):
        count_finished(redis_db, "audit")

    rows = {row["queue"]: row for row in json.loads(calhook_queues(redis_url, "--json"))}

    assert {"dispatch", "audit", "crm"} <= set(rows)
    dispatch, audit, crm = rows["dispatch"], rows["audit"], rows["crm"]
    assert (dispatch["ready"], dispatch["parked"]) == (3, 1)
    assert 99 <= dispatch["oldest_age_s"] < 130
    assert (audit["ready"], audit["unacked"], audit["done_last_min"]) == (0, 2, 5)
    assert (crm["delayed"], crm["dead"]) == (1, 1)

    table = calhook_queues(redis_url)
    header, *lines = table.splitlines()
    assert header.split() == [
        "queue", "ready", "unacked", "delayed", "dead", "parked", "oldest", "done/min"
    ]  # fmt: skip
    [dispatch_line] = [line.split() for line in lines if line.startswith("dispatch")]
    assert dispatch_line[:6] == ["dispatch", "3", "0", "0", "0", "1"]
    assert dispatch_line[6].endswith("s")
    assert 99 <= int(dispatch_line[6][:-1]) < 130
