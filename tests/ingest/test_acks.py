"""CALHOOK_ACK_DURABILITY: a batch is answered only once the broker confirms it as asked, and a
batch it does not confirm in time goes to the spool (still 202), drained once it can be."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from aiohttp import web
from redis.asyncio import Redis as AsyncRedis

from calhook.messages import event_record
from calhook.redis_server import RedisServer, free_port
from calhook.settings import SettingsError, load_settings
from calhook.store.connect import clock
from calhook.store.keys import CONFIRMED
from ingest.acks import AckConfigError, AckRule, ack_rule
from ingest.app import create_app
from ingest.durable import DurableWriter
from ingest.publisher import Outgoing, Publisher, PublishError
from ingest.spool import Spool
from tests.ingest.stored import queued_ids
from tests.support.waiting import await_for, wait_for

CLOCK = clock(load_settings(redis_url="redis://127.0.0.1:1/0", allow_unauthenticated=True))
FSYNCED = AckRule("fsynced", 0, 1.0)


def event(n: int) -> Outgoing:
    record = event_record("default", time.time(), "t", f"ack-body-{n}".encode())
    return Outgoing(f"dedup:ack:{n}", f"evt-ack-{n}", record)


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server of our own with the AOF on, fsynced at every write (the embedded Valkey has
    WAITAOF)."""
    with RedisServer(tmp_path_factory.mktemp("ack-master"), appendfsync="always") as server:
        yield server


@pytest.fixture
async def amaster(master: RedisServer) -> AsyncIterator[AsyncRedis]:
    client = AsyncRedis.from_url(master.url)
    await client.flushall()
    yield client
    await client.aclose()


def publisher(client: AsyncRedis, ack: AckRule | None) -> Publisher:
    return Publisher(client, clock=CLOCK, dedup_ttl_s=3600, batch_max=16, timeout_s=5, ack=ack)


def test_the_levels_of_the_settings() -> None:
    def rule(**values: object) -> AckRule | None:
        return ack_rule(load_settings(redis_url="redis://h:6379/0", **values))

    assert rule() is None
    assert rule(ack_durability="fsynced") == AckRule("fsynced", 0, 1.5)
    assert rule(ack_durability="replicated", ack_replicas=2, ack_timeout_s=3) == AckRule(
        "replicated", 2, 3.0
    )
    assert FSYNCED.commands() == [("WAITAOF", 1, 0, 1000)]
    assert AckRule("replicated", 2, 0.5).commands() == [("WAITAOF", 1, 0, 500), ("WAIT", 2, 500)]
    assert AckRule("replicated", 1, 0.5, waitaof=False).commands() == [("WAIT", 1, 500)]
    with pytest.raises(SettingsError, match="CALHOOK_ACK_DURABILITY: Input should be"):
        load_settings(redis_url="redis://h:6379/0", ack_durability="quorum")


async def test_fsynced_answers_once_the_batch_is_on_disk(amaster: AsyncRedis) -> None:
    publishing = publisher(amaster, FSYNCED)
    await publishing.start()
    assert await publishing.publish(event(1)) is None
    before = int(await amaster.get(CONFIRMED) or 0)
    # A retransmission: the batch writes nothing of its own, and is still confirmed, after the
    # counter's write that makes the wait cover whatever the first write left unconfirmed.
    assert await publishing.publish(event(1)) is None
    await publishing.close()
    assert publishing.unconfirmed == 0
    assert int(await amaster.get(CONFIRMED) or 0) == before + 1
    assert await amaster.hget("calhook:ev:evt-ack-1", "type") == b"t"


async def test_a_server_restarted_with_an_empty_script_cache_is_written_to(
    amaster: AsyncRedis,
) -> None:
    publishing = publisher(amaster, FSYNCED)
    await publishing.start()
    await amaster.script_flush()
    assert await publishing.publish(event(2)) is None
    await publishing.close()
    assert await amaster.exists("calhook:ev:evt-ack-2") == 1


async def test_fsynced_needs_appendfsync_always(tmp_path: Path) -> None:
    # Under everysec, WAITAOF waits for the once-a-second fsync, or (redis/redis#13793, in the
    # embedded Valkey 8.1) confirms writes not yet on disk: neither is an fsynced answer.
    with RedisServer(tmp_path, appendfsync="everysec") as server:
        client = AsyncRedis.from_url(server.url)
        publishing = publisher(client, FSYNCED)
        with pytest.raises(AckConfigError, match="needs appendfsync always on the broker, which"):
            await publishing.start()
        # `replicated` on the same broker waits for the replicas only.
        replicating = publisher(client, AckRule("replicated", 1, 0.2))
        await replicating.start()
        with pytest.raises(PublishError, match="on 0 of 1 replicas"):
            await replicating.publish(event(4))
        await replicating.close()
        assert await client.get(CONFIRMED) == b"1"
        await client.aclose()


async def test_fsynced_needs_appendonly(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        client = AsyncRedis.from_url(server.url)
        await client.config_set("appendonly", "no")
        publishing = publisher(client, FSYNCED)
        with pytest.raises(AckConfigError, match="needs appendonly yes"):
            await publishing.start()
        await client.aclose()


@pytest.fixture
def redis_7_0(tmp_path: Path) -> Iterator[str]:
    """A server without WAITAOF: Debian's redis-server 7.0 where the machine has one."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH to stand for a server without WAITAOF")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _answers(client), timeout_s=10)
        if tuple(map(int, client.info("server")["redis_version"].split(".")[:2])) >= (7, 2):
            pytest.skip("the redis-server on PATH has WAITAOF")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


async def test_fsynced_is_refused_at_start_on_a_server_without_waitaof(
    redis_7_0: str, tmp_path: Path
) -> None:
    settings = load_settings(
        redis_url=redis_7_0,
        auth_secrets="s",
        spool_dir=str(tmp_path / "spool"),
        ack_durability="fsynced",
    )
    app = create_app(settings)
    with pytest.raises(SettingsError, match=r"fsynced needs WAITAOF \(Redis 7.2"):
        await web.AppRunner(app).setup()


async def test_replicated_falls_back_to_wait_on_a_server_without_waitaof(redis_7_0: str) -> None:
    client = AsyncRedis.from_url(redis_7_0)
    publishing = publisher(client, AckRule("replicated", 1, 0.2))
    await publishing.start()
    # No replica: not confirmed, so the caller spools it.
    with pytest.raises(PublishError, match="on 0 of 1 replicas"):
        await publishing.publish(event(3))
    await publishing.close()
    await client.aclose()


async def test_replicated_spools_until_a_replica_confirms_then_drains_once(
    master: RedisServer, amaster: AsyncRedis, tmp_path: Path
) -> None:
    # Given an ingress writing with `replicated` to a master that has no replica yet.
    publishing = publisher(amaster, AckRule("replicated", 1, 0.3))
    writer = DurableWriter(amaster, publishing, Spool(tmp_path / "spool"), retry_interval_s=0.1)
    await publishing.start()
    await writer.start()

    # When events arrive: each is answered (the spool holds it), none is lost.
    for n in range(5):
        assert await writer.write(event(10 + n)) is None
    assert writer.spooling
    assert writer.spooled == 5
    assert publishing.unconfirmed >= 1
    # The first batch did reach the master, unconfirmed; the others wait in the spool.
    assert await amaster.exists("calhook:ev:evt-ack-10") == 1

    # Then a replica with its own AOF joins, and the spool drains through the same confirmation.
    with RedisServer(tmp_path / "replica") as replica:
        replica_client = redis.Redis.from_url(replica.url)
        replica_client.replicaof("127.0.0.1", master.port)
        await await_for(lambda: not writer.spooling, timeout_s=30)
        assert writer.spool_depth() == 0
        # Every event once on the dispatch queue, and on the replica.
        sync_master = redis.Redis.from_url(master.url)
        assert sorted(queued_ids(sync_master)) == [f"evt-ack-{10 + n}" for n in range(5)]
        sync_master.close()
        wait_for(lambda: replica_client.exists("calhook:ev:evt-ack-14") == 1, timeout_s=10)
        replica_client.replicaof("NO", "ONE")
        replica_client.close()
    await writer.close()
