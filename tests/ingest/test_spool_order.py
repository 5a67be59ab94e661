"""Spooling ends only when nothing is left to drain, appends still being fsynced included: the
events of a Redis outage reach the queue in the order the ingress acknowledged them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from calhook.messages import event_record
from calhook.redis_server import RedisServer
from calhook.settings import load_settings
from calhook.store.connect import clock
from ingest.durable import DurableWriter
from ingest.publisher import Outgoing, Publisher
from ingest.spool import Sink, Spool, _Segment
from tests.ingest.stored import ids_of
from tests.support.waiting import await_for


class HeldSpool(Spool):
    """A real spool whose writes wait for ``release``, like a disk with a slow fsync.

    ``rounds`` counts the drain rounds the writer completed: each pinged Redis successfully.
    """

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.writing = threading.Event()
        self.release = threading.Event()
        self.rounds = 0

    def _write_sync(self, seg: _Segment, start: int, events: list[Outgoing]) -> int:
        self.writing.set()
        self.release.wait(timeout=60)
        return super()._write_sync(seg, start, events)

    async def drain_orphans(self, sink: Sink, *, batch_max: int = 256) -> int:
        drained = await super().drain_orphans(sink, batch_max=batch_max)
        self.rounds += 1
        return drained


_RECEIVED_AT = time.time()


def event(n: int) -> Outgoing:
    record = event_record("default", _RECEIVED_AT, "t", f"body-{n}".encode())
    return Outgoing(f"dedup:{n}", f"evt-{n}", record)


async def test_depth_counts_an_append_until_it_is_written_even_if_its_caller_gives_up(
    tmp_path: Path,
) -> None:
    spool = HeldSpool(tmp_path / "spool")
    await spool.open()
    try:
        # Given: an append whose write is held, and whose caller stops waiting for it.
        caller = asyncio.create_task(spool.append(event(0)))
        await asyncio.sleep(0)  # let the append start
        assert spool.depth() == 1
        await await_for(spool.writing.is_set, what="the spool's write to start")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert spool.depth() == 1  # the record is still being written

        # When the write ends, Then the record is there to drain.
        spool.release.set()
        drained: list[Outgoing] = []

        async def sink(batch: list[Outgoing]) -> None:
            drained.extend(batch)

        await await_for(lambda: spool.batches == 1, what="the held write to end")
        assert spool.depth() == 1
        assert await spool.drain(sink) == 1
        assert (drained, spool.depth()) == ([event(0)], 0)
    finally:
        spool.release.set()
        await spool.close()


@pytest.fixture
async def down_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis server with its port chosen but not started yet: Redis is down until started."""
    server = RedisServer(tmp_path / "redis")
    yield server
    await asyncio.to_thread(server.stop)


async def test_an_event_spooled_while_redis_comes_back_reaches_redis_before_later_ones(
    tmp_path: Path, down_redis: RedisServer
) -> None:
    redis = Redis.from_url(down_redis.url, socket_timeout=1, socket_connect_timeout=0.5)
    timings = clock(load_settings(redis_url=down_redis.url, auth_secrets="s"))
    publisher = Publisher(redis, clock=timings, dedup_ttl_s=86_400, batch_max=64, timeout_s=0.5)
    spool = HeldSpool(tmp_path / "spool")
    writer = DurableWriter(redis, publisher, spool, retry_interval_s=0.05)
    acknowledged: list[str] = []

    async def write(n: int) -> None:
        assert await writer.write(event(n)) is None
        acknowledged.append(event(n).event_id)

    await publisher.start()
    await writer.start()
    try:
        # Given: Redis is down, so three events go to the spool, whose fsync is slow.
        spooled = [asyncio.create_task(write(n)) for n in range(3)]
        await await_for(spool.writing.is_set, what="the spool's write to start")
        assert writer.spooling

        # When: Redis comes back and the drainer finds the spool empty, the write still going.
        await asyncio.to_thread(down_redis.start)
        await await_for(lambda: spool.rounds > 0, what="a drain round with redis back")
        spool.release.set()
        await asyncio.gather(*spooled)
        for n in range(3, 6):  # each acknowledged after the spooled ones
            await write(n)

        # Then: the queue names the events in the order they were acknowledged (a dispatch
        # message names every event of one batch).
        async def queued() -> list[str]:
            return ids_of(await redis.lrange("dispatch", 0, -1))

        await await_for(lambda: writer.spool_depth() == 0, what="the spool to drain")
        await await_for(lambda: not writer.spooling, what="spooling to end")
        assert await queued() == acknowledged
    finally:
        spool.release.set()
        await writer.close()
        await redis.aclose()
