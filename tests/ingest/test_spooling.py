"""Redis slow or down: the ingress spools, answers 202 as usual, and drains back in order,
without duplicates, also after a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from calhook.constants import DISPATCH_QUEUE, DISPATCH_TASK, dedup_key
from calhook.messages import task_message
from calhook.redis_server import free_port
from calhook.settings import Settings
from calhook.store.keys import NOTICES
from ingest import create_app
from ingest.app import WRITER
from ingest.publisher import Outgoing
from ingest.spool import Spool
from tests.conftest import FIXTURES, SECRET
from tests.ingest.stored import queued, queued_ids
from tests.support.proxy import SlowProxy
from tests.support.waiting import await_for

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
BODY = (FIXTURES / "customer.updated.nested.json").read_bytes()


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
    # One operational notice tells of the spell (workers/notices.py sends it).
    entries: list[tuple[bytes, dict[bytes, bytes]]] = redis_db.xrange(NOTICES)  # type: ignore[assignment]
    [(_, notice)] = entries
    assert notice[b"kind"] == b"ingress_spooled"
    assert orjson.loads(notice[b"data"])["spooled"] == 20
    assert b"20 events waited in its spool" in notice[b"text"]


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


def legacy_message(event_id: str, body: bytes, endpoint: str, received_at: float) -> bytes:
    """What calhook spooled before the store kept bodies: a Celery dispatch message with the
    event in its arguments."""
    kwargs = {
        "event_id": event_id,
        "body": body.decode(),
        "endpoint": endpoint,
        "received_at": received_at,
    }
    return task_message(
        DISPATCH_TASK,
        queue=DISPATCH_QUEUE,
        task_id=event_id,
        kwargs=kwargs,
        kwargsrepr=orjson.dumps({"event_id": event_id, "type": "customer.updated"}).decode(),
    )


async def test_events_an_older_calhook_spooled_are_drained_into_the_store(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    # Given: a spool left by an older calhook, holding Celery dispatch messages.
    settings = make_settings()
    received_at = time.time() - 60
    old = Spool(Path(settings.spool_dir))
    await old.open()
    for n, endpoint in enumerate(("default", "shop")):
        message = legacy_message(f"evt-old-{n}", BODY + b" " * n, endpoint, received_at + n)
        await old.append(Outgoing(dedup_key(f"{n:064x}"), f"evt-old-{n}", message))
    await old.close()

    # When today's ingress starts on it.
    app = create_app(settings)
    async with TestClient(TestServer(app)):
        await await_for(lambda: app[WRITER].spool_depth() == 0, what="the old spool to drain")

    # Then: each event is stored as today's ingress stores one (its body once, by id), in the
    # order spooled, and queued for dispatch by id.
    events = queued(redis_db)
    assert [(e.event_id, e.endpoint, e.received_at, e.body, e.dispatch) for e in events] == [
        ("evt-old-0", "default", received_at, BODY, "queued"),
        ("evt-old-1", "shop", received_at + 1, BODY + b" ", "queued"),
    ]
