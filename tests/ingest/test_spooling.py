"""Redis slow or down: the ingress spools, answers 202 as usual, and drains back in order,
without duplicates, also after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from calhook.messages import read_task_message
from calhook.redis_server import free_port
from calhook.settings import Settings
from ingest import create_app
from ingest.app import WRITER
from tests.conftest import FIXTURES, SECRET
from tests.support.proxy import SlowProxy
from tests.support.waiting import await_for

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
BODY = (FIXTURES / "customer.updated.nested.json").read_bytes()


def queued_ids(redis_db: redis.Redis) -> list[str]:
    raw: list[bytes] = redis_db.lrange("dispatch", 0, -1)  # type: ignore[assignment]
    return [read_task_message(m)[2]["event_id"] for m in reversed(raw)]


async def post_many(client: TestClient[Any, Any], n: int, first: int = 0) -> list[str]:
    # Distinct bodies: the same bytes would be (rightly) recognised as a retransmission.
    answers = await asyncio.gather(
        *(
            client.post("/webhooks/calenso", data=BODY + b" " * i, headers=AUTH)
            for i in range(first, first + n)
        )
    )
    assert [a.status for a in answers] == [202] * n
    return [str((await a.json())["event_id"]) for a in answers]


async def test_a_stalled_redis_is_spooled_then_drained_without_duplicates(
    make_settings: Callable[..., Settings], redis_db: redis.Redis, slow_redis: SlowProxy
) -> None:
    app = create_app(make_settings(redis_url=f"redis://127.0.0.1:{slow_redis.port}/0"))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/readyz")).status == 200
        slow_redis.delay_s = 1.0  # Redis still executes every write; its answers come too late

        ids = await post_many(client, 20)

        writer = app[WRITER]
        assert writer.spooled == 20
        assert writer.spooling
        slow_redis.delay_s = 0
        await await_for(lambda: not writer.spooling, what="the spool to drain")

    # Some first writes reached Redis before their deadline passed; drain found them by their
    # dedup key and did not queue them again.
    assert sorted(queued_ids(redis_db)) == sorted(ids)


async def test_spooled_events_survive_a_restart_and_drain_in_order(
    make_settings: Callable[..., Settings], redis_db: redis.Redis, redis_url: str
) -> None:
    down = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app: web.Application = create_app(down)
    async with TestClient(TestServer(app)) as client:
        ids = []
        for i in range(10):  # one at a time, so that the arrival order is known
            ids += await post_many(client, 1, first=i)
        assert app[WRITER].spool_depth() == 10
    assert redis_db.llen("dispatch") == 0

    again = create_app(make_settings(spool_dir=down.spool_dir))
    async with TestClient(TestServer(again)) as client:
        await await_for(lambda: again[WRITER].spool_depth() == 0, what="the restart to drain")
        ready = await (await client.get("/readyz")).json()

    assert queued_ids(redis_db) == ids
    assert (ready["spooling"], ready["spool_depth"]) == (False, 0)
    # Each event's trail says it waited in the spool.
    [entry] = [orjson.loads(e) for e in redis_db.lrange(f"calhook:trail:{ids[0]}", 0, -1)]
    assert entry["what"] == "spooled"
