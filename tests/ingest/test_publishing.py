"""Publishing: Celery's own message format, batching, a loop that never waits on Redis, and a
shutdown that flushes what is pending."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from celery import Celery
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis as AsyncRedis

from calhook.messages import event_record, read_task_message, task_message
from calhook.settings import Settings
from calhook.store.connect import clock
from calhook.store.keys import DISPATCH_PAIR, DUE, body_key, due_member, event_key
from ingest import create_app
from ingest.app import PUBLISHER
from ingest.publisher import Outgoing, Publisher
from tests.conftest import FIXTURES, SECRET
from tests.ingest.stored import dispatch_messages, queued_ids
from tests.support.proxy import SlowProxy

BODY = (FIXTURES / "appointment.booking.created.nested.json").read_bytes()
AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}


def outgoing(n: int | str, event_id: str | None = None, body: bytes | None = None) -> Outgoing:
    """An accepted event as the ingress hands it over: dedup key ``d<n>``, id ``e<n>``."""
    record = event_record("default", time.time(), "t", body or f"m{n}".encode())
    return Outgoing(f"d{n}", event_id or f"e{n}", record)


def shape(value: Any) -> Any:
    """The keys and value types of a message, recursively, without the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def test_message_has_the_shape_celery_itself_writes(redis_db: redis.Redis, redis_url: str) -> None:
    celery = Celery("probe", broker=redis_url)
    celery.conf.task_ignore_result = True
    celery.send_task("calhook.dispatch", kwargs={"event_id": "x"}, queue="probe", task_id="t-1")
    theirs = orjson.loads(redis_db.lindex("probe", 0))  # type: ignore[arg-type]
    celery.close()

    ours = orjson.loads(task_message("calhook.dispatch", queue="probe", kwargs={"event_id": "x"}))

    # Values Celery fills from its own process differ by design: ignore_result is our
    # choice (True), reply_to is unused (no results).
    theirs["headers"]["ignore_result"] = True
    assert shape(ours) == shape(theirs)
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    assert (
        read_task_message(orjson.dumps(ours))[1:3] == read_task_message(orjson.dumps(theirs))[1:3]
    )


async def test_the_dispatch_message_the_script_writes_has_the_shape_celery_writes(
    redis_db: redis.Redis, redis_url: str, make_settings: Callable[..., Settings]
) -> None:
    # Given: Celery's own message for the same task and arguments.
    celery = Celery("probe", broker=redis_url)
    celery.conf.task_ignore_result = True
    kwargs = {"ids": ["e1"], "seq": 1}
    celery.send_task("calhook.dispatch", kwargs=kwargs, queue="probe", task_id="dispatch.1")
    theirs = orjson.loads(redis_db.lindex("probe", 0))  # type: ignore[arg-type]
    celery.close()

    # When the ingress's script accepts an event (accept.lua builds the message in Lua).
    client = AsyncRedis.from_url(redis_url)
    publisher = Publisher(
        client, clock=clock(make_settings()), dedup_ttl_s=60, batch_max=8, timeout_s=5
    )
    await publisher.start()
    assert await publisher.publish(outgoing(1)) is None
    await publisher.close()
    await client.aclose()
    raw = redis_db.lindex("dispatch", 0)
    assert isinstance(raw, bytes)
    ours = orjson.loads(raw)

    # Then: the same keys and value types, a plain JSON body Celery reads as it is (kombu
    # decodes only base64), the anonymous exchange routing by queue name, and a delivery tag
    # that names the queue and the message's number on it.
    theirs["headers"]["ignore_result"] = True
    assert shape(ours) == shape(theirs)
    assert ours["properties"]["body_encoding"] == "utf-8"
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": "dispatch"}
    assert ours["properties"]["delivery_tag"] == ours["headers"]["id"] == "dispatch.1"
    assert read_task_message(raw)[:3] == read_task_message(orjson.dumps(theirs))[:3]


async def test_slow_redis_does_not_stall_other_requests(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    redis_db: redis.Redis,
    slow_redis: SlowProxy,
) -> None:
    settings = make_settings(
        redis_url=f"redis://127.0.0.1:{slow_redis.port}/0", redis_timeout_s=5.0
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    assert (await client.get("/readyz")).status == 200  # connected before Redis turns slow
    slow_redis.delay_s = 0.4

    posts = [
        asyncio.create_task(client.post("/webhooks/calenso", data=BODY + b" " * n, headers=AUTH))
        for n in range(30)
    ]
    health = await client.get("/healthz")

    assert health.status == 200
    assert not any(p.done() for p in posts), "a health check waited for Redis"
    answers = await asyncio.gather(*posts)
    assert [a.status for a in answers] == [202] * 30
    publisher = app[PUBLISHER]
    assert publisher.largest_batch > 1, "concurrent requests were not batched"
    assert publisher.batches < 30
    assert sorted(queued_ids(redis_db)) == sorted([(await a.json())["event_id"] for a in answers])
    # One dispatch message per batch, naming the batch's events.
    assert redis_db.llen("dispatch") == publisher.batches


async def test_close_flushes_pending_writes(
    redis_db: redis.Redis, slow_redis: SlowProxy, make_settings: Callable[..., Settings]
) -> None:
    client = AsyncRedis.from_url(f"redis://127.0.0.1:{slow_redis.port}/0")
    await client.ping()
    publisher = Publisher(
        client, clock=clock(make_settings()), dedup_ttl_s=86_400, batch_max=4, timeout_s=5
    )
    await publisher.start()
    slow_redis.delay_s = 0.2

    pending = [asyncio.create_task(publisher.publish(outgoing(n))) for n in range(10)]
    await asyncio.sleep(0)  # let every publish enqueue itself before shutdown starts
    await publisher.close()

    assert await asyncio.gather(*pending) == [None] * 10
    assert queued_ids(redis_db) == [f"e{n}" for n in range(10)]
    await client.aclose()


async def test_one_script_call_writes_a_batch_with_its_duplicates(
    redis_db: redis.Redis, redis_url: str, make_settings: Callable[..., Settings]
) -> None:
    client = AsyncRedis.from_url(redis_url)
    publisher = Publisher(
        client, clock=clock(make_settings()), dedup_ttl_s=86_400, batch_max=64, timeout_s=5
    )
    await publisher.start()
    redis_db.set("dseen", "e-first")  # a body seen before this batch
    events = [outgoing(n) for n in range(5)]
    events += [outgoing(2, "e-again", b"m2-again"), outgoing("seen", "e-late", b"late")]

    results = await asyncio.gather(*(publisher.publish(event) for event in events))
    await publisher.close()
    await client.aclose()

    assert publisher.batches == 1
    # The repeat within the batch is a duplicate of the one before it; the old one of the first.
    assert results == [None] * 5 + ["e2", "e-first"]
    # One dispatch message names the new events, in order; each body is stored once, and each
    # dispatch is watched by the scheduler's sweep in case its message is lost.
    [(task, _, kwargs, _)] = dispatch_messages(redis_db)
    assert (task, kwargs["ids"]) == ("calhook.dispatch", [f"e{n}" for n in range(5)])
    assert [redis_db.get(body_key(f"e{n}")) for n in range(5)] == [b"m%d" % n for n in range(5)]
    assert redis_db.hget(event_key("e0"), f"{DISPATCH_PAIR}/s") == b"queued"
    watched = redis_db.zrange(DUE, 0, -1)
    assert sorted(watched) == [due_member(f"e{n}", DISPATCH_PAIR).encode() for n in range(5)]
    # The duplicates left nothing.
    for duplicate in ("e-again", "e-late"):
        assert redis_db.exists(event_key(duplicate), body_key(duplicate)) == 0
    assert redis_db.ttl("d0") > 86_000


async def test_a_flushed_script_cache_is_reloaded(
    redis_db: redis.Redis, redis_url: str, make_settings: Callable[..., Settings]
) -> None:
    client = AsyncRedis.from_url(redis_url)
    publisher = Publisher(
        client, clock=clock(make_settings()), dedup_ttl_s=86_400, batch_max=64, timeout_s=5
    )
    await publisher.start()
    assert await publisher.publish(outgoing(1)) is None
    redis_db.script_flush()  # as after a Redis restart
    assert await publisher.publish(outgoing(2)) is None
    await publisher.close()
    await client.aclose()
    assert queued_ids(redis_db) == ["e1", "e2"]
