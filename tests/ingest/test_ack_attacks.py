"""Attacks on CALHOOK_ACK_DURABILITY, driven step by step on real servers: an event answered
under ``fsynced``/``replicated`` is durable as promised, each is queued exactly once, and nothing
answered is lost. A replica is made to lag with SIGSTOP, a master is killed mid-confirmation and
restarted from its AOF, connections are cut, the script cache is emptied, two ingress processes
race on the same bodies. Two breaks found here are fixed: fsynced on a broker that refuses
CONFIG, and a broker that came back different, now checked again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis as AsyncRedis

from calhook.messages import event_record
from calhook.redis_server import RedisServer
from calhook.settings import load_settings
from calhook.store.connect import async_client, clock
from calhook.store.keys import CONFIRMED, event_key
from ingest.acks import AckConfigError, AckRule
from ingest.app import WRITER, create_app
from ingest.durable import DurableWriter
from ingest.publisher import Outgoing, Publisher, PublishError
from ingest.spool import Spool
from tests.ingest.stored import queued_ids
from tests.support.waiting import await_for, wait_for

CLOCK = clock(load_settings(redis_url="redis://127.0.0.1:1/0", allow_unauthenticated=True))
# A full sync starts at once, not after the 5 s a master waits for more replicas.
FAST_SYNC = ("--repl-diskless-sync-delay", "0")
HOST = "127.0.0.1"


def event(n: int, body: int | None = None) -> Outgoing:
    """Event ``n``; ``body`` names its body, so two events can carry the same one."""
    text = f"attack-body-{n if body is None else body}".encode()
    record = event_record("default", time.time(), "t", text)
    return Outgoing(f"dedup:attack:{n if body is None else body}", f"evt-atk-{n}", record)


def replica_of(master: RedisServer, data_dir: Path) -> RedisServer:
    return RedisServer(data_dir, replica_of=(HOST, master.port), extra_args=FAST_SYNC)


def in_sync(master: RedisServer, replica: RedisServer) -> bool:
    """The replica linked and done writing its first AOF (until then it refuses SIGTERM)."""
    with redis.Redis.from_url(master.url) as m, redis.Redis.from_url(replica.url) as r:
        try:
            link = r.info("replication").get("master_link_status")
            aof = r.info("persistence")
            return bool(
                link == "up"
                and m.info("replication")["connected_slaves"] >= 1
                and not aof["aof_rewrite_in_progress"]
                and not aof["aof_rewrite_scheduled"]
            )
        except redis.ConnectionError:
            return False


@contextlib.contextmanager
def joining(master: RedisServer, data_dir: Path) -> Iterator[RedisServer]:
    """A replica that joins ``master`` now, stopped once it has settled."""
    with replica_of(master, data_dir) as replica:
        yield replica
        wait_for(lambda: in_sync(master, replica), timeout_s=15, what="the replica settled")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master fsyncing every write and one replica in sync with it."""
    master = RedisServer(tmp_path / "master", appendfsync="always", extra_args=FAST_SYNC)
    replica = replica_of(master, tmp_path / "replica")
    with master, replica:
        wait_for(lambda: in_sync(master, replica), timeout_s=15, what="the replica in sync")
        try:
            yield master, replica
        finally:
            # A stopped replica would not stop on SIGTERM.
            if replica.pid is not None and replica.running:
                os.kill(replica.pid, signal.SIGCONT)


@contextlib.contextmanager
def stopped(server: RedisServer) -> Iterator[None]:
    """``server`` frozen (SIGSTOP): it receives nothing it acknowledges, until resumed."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


class Ingress:
    """One ingress process's writing half: its own client, publisher, writer and spool."""

    def __init__(self, url: str, spool_dir: Path, rule: AckRule, batch_max: int = 16) -> None:
        # As ingest/app.py builds it: the socket timeout a backstop behind the publisher's.
        self.redis = async_client(url, socket_timeout=1.0 + 2 * rule.timeout_s)
        self.publisher = Publisher(
            self.redis, clock=CLOCK, dedup_ttl_s=3600, batch_max=batch_max, timeout_s=0.25,
            ack=rule,
        )  # fmt: skip
        self.writer = DurableWriter(
            self.redis, self.publisher, Spool(spool_dir), retry_interval_s=0.05
        )

    async def __aenter__(self) -> Ingress:
        await self.publisher.start()
        await self.writer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.writer.close()
        await self.redis.aclose()

    async def drained(self, timeout_s: float = 20) -> None:
        await await_for(
            lambda: not self.writer.spooling and self.writer.spool_depth() == 0,
            timeout_s=timeout_s,
            what="the spool drained",
        )


def queued_once(url: str, ids: list[str]) -> None:
    """Every id of ``ids`` on the dispatch queue exactly once, stored once, nothing else."""
    with redis.Redis.from_url(url) as client:
        counts = Counter(queued_ids(client))
        assert counts == Counter(ids), counts
        for event_id in ids:
            assert client.exists(event_key(event_id)) == 1


def has(url: str, event_id: str) -> bool:
    with redis.Redis.from_url(url) as client:
        return bool(client.exists(event_key(event_id)))


async def test_a_resent_batch_is_confirmed_only_past_its_first_write_and_queued_once(
    pair: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    master, replica = pair
    async with Ingress(master.url, tmp_path / "spool", AckRule("replicated", 1, 0.2)) as ing:
        # Given a replica that receives nothing (frozen) when a batch is written
        with stopped(replica):
            for n in range(3):
                assert await ing.writer.write(event(n)) is None
            # Then the first write reached the master unconfirmed: the batch is in the spool
            assert ing.writer.spooling
            assert ing.writer.spool_depth() == 3
            assert has(master.url, "evt-atk-0")
            # When the script cache is lost, and the drainer resends (duplicates only: nothing
            # new to write but the counter, reached through NOSCRIPT and a reload)
            with redis.Redis.from_url(master.url) as sync:
                sync.script_flush()
                counted = int(sync.get(CONFIRMED) or 0)
            await await_for(lambda: ing.publisher.unconfirmed >= 4, timeout_s=10)
            # Then no resend is confirmed while the replica has not got the first write
            assert ing.writer.spooling
            assert ing.writer.spool_depth() == 3
            with redis.Redis.from_url(master.url) as sync:
                assert int(sync.get(CONFIRMED) or 0) > counted
        # And once the replica is back, each event is drained and queued once, on both servers
        await ing.drained()
    ids = [f"evt-atk-{n}" for n in range(3)]
    queued_once(master.url, ids)
    wait_for(lambda: has(replica.url, "evt-atk-2"), timeout_s=10)
    queued_once(replica.url, ids)


async def test_a_master_killed_mid_confirmation_answers_nothing_and_its_aof_write_drains_once(
    pair: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    master, replica = pair
    async with Ingress(master.url, tmp_path / "spool", AckRule("replicated", 1, 2.0)) as ing:
        with stopped(replica):
            # Given a batch written and fsynced, its WAIT blocked on the frozen replica
            writing = asyncio.create_task(ing.publisher.publish(event(7)))
            await await_for(lambda: has(master.url, "evt-atk-7"), timeout_s=5)
            # When the master is SIGKILLed before it answers the WAIT
            master.stop(kill=True)
            # Then the publish fails: no success for a write whose confirmation never came
            with pytest.raises(PublishError):
                await writing
            # And the writer spools what comes next rather than answering from a dead master
            assert await ing.writer.write(event(8)) is None
            assert ing.writer.spooling
            # When the master comes back from its AOF (the batch was on disk)
            master.restart()
            assert has(master.url, "evt-atk-7")
        # Then, the replica resynced, the spool drains and each event is queued once
        await ing.drained()
    wait_for(lambda: in_sync(master, replica), timeout_s=15, what="the replica settled")
    # evt-atk-7 was answered with an error (the caller would spool and resend it): queued once
    # from its first write; evt-atk-8 from the spool.
    queued_once(master.url, ["evt-atk-7", "evt-atk-8"])


async def test_a_connection_cut_mid_pipeline_is_not_a_confirmation(
    pair: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    master, replica = pair
    async with Ingress(master.url, tmp_path / "spool", AckRule("replicated", 1, 1.0)) as ing:
        with stopped(replica), redis.Redis.from_url(master.url) as sync:
            # Given a write whose WAIT is blocked
            writing = asyncio.create_task(ing.writer.write(event(20)))
            await await_for(lambda: has(master.url, "evt-atk-20"), timeout_s=5)
            # When its connection is cut (redis-py then resends the whole pipeline)
            assert sync.client_kill_filter(_type="normal", skipme=True) >= 1
            # Then the event is spooled, not answered from Redis
            assert await writing is None
            assert ing.writer.spooled == 1
        await ing.drained()
    queued_once(master.url, ["evt-atk-20"])


async def test_many_publishes_while_the_replica_flaps_each_queued_once(
    pair: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    master, replica = pair
    answers: dict[int, str | None] = {}

    async def wave() -> None:
        ids = range(len(answers), len(answers) + 40)
        results = await asyncio.gather(*(ing.writer.write(twin(n)) for n in ids))
        answers.update(zip(ids, results, strict=True))

    async with Ingress(master.url, tmp_path / "spool", AckRule("replicated", 1, 0.05)) as ing:
        # 15 flaps of the replica: a wave of 40 requests while it is stopped (written
        # unconfirmed, then spooled, the drainer resending in vain), one once it has resumed and
        # the spool drained (written, confirmed); a third retransmit an earlier one's body
        for _ in range(15):
            with stopped(replica):
                await wave()
            await ing.drained()
            await wave()
        await ing.drained()
    assert ing.publisher.unconfirmed >= 15
    # Each body once: a retransmission names the first event, or both went to the spool and the
    # drain found the first one (the second is then not stored).
    with redis.Redis.from_url(master.url) as client:
        counts = Counter(queued_ids(client))
        firsts = {client.get(twin(n).dedup_key) for n in answers}
    assert set(counts.values()) == {1}
    assert set(counts) == {v.decode() for v in firsts if isinstance(v, bytes)}
    assert len(counts) == len([n for n in answers if n % 3 != 2])
    for n, first in answers.items():
        assert first is None or (n % 3 == 2 and first == f"evt-atk-{n - 2}")


def twin(n: int) -> Outgoing:
    """Event ``n``; every third one carries the body of the one two before it."""
    return event(n, body=n - 2 if n % 3 == 2 else n)


async def test_two_ingresses_on_the_same_bodies_one_unconfirmed_queue_each_body_once(
    pair: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    master, _ = pair
    one = Ingress(master.url, tmp_path / "spool-a", AckRule("replicated", 1, 0.2))
    # The other asks for two replicas: none of its batches is confirmed.
    two = Ingress(master.url, tmp_path / "spool-b", AckRule("replicated", 2, 0.2))
    async with one, two:
        # Given bodies 0-4 arriving first at the unconfirmed ingress (its first batch written
        # unconfirmed, the rest spooled, its drainer resending them unconfirmed), 5-9 first at
        # the other
        for n in range(5):
            assert await two.writer.write(event(100 + n, body=n)) is None
        assert two.writer.spooling
        assert two.writer.spool_depth() == 5
        firsts = [await one.writer.write(event(200 + n, body=n)) for n in range(10)]
        # A body the unconfirmed ingress wrote first is answered as its duplicate here (the
        # counter's write after it makes this confirmation cover it), unless this one spooled
        assert firsts[0] == "evt-atk-100" or one.writer.spooled
        assert all(first in (None, f"evt-atk-{100 + n}") for n, first in enumerate(firsts))
        for n in range(5, 10):
            assert await two.writer.write(event(100 + n, body=n)) is None
        # When a second replica joins, the unconfirmed ingress drains
        with joining(master, tmp_path / "second"):
            await two.drained()
        await one.drained()
    # Then each body is queued once, under the id its first write gave it, which is the one a
    # duplicate was answered with.
    with redis.Redis.from_url(master.url) as client:
        stored = [client.get(f"dedup:attack:{n}") for n in range(10)]
    ids = [v.decode() for v in stored if isinstance(v, bytes)]
    assert len(ids) == 10
    queued_once(master.url, ids)
    assert all(first in (None, ids[n]) for n, first in enumerate(firsts))


async def test_more_replicas_asked_than_there_are_spools_and_stays_ready_until_they_join(
    pair: tuple[RedisServer, RedisServer], tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    master, _ = pair
    settings = load_settings(
        redis_url=master.url,
        auth_secrets="s",
        spool_dir=str(tmp_path / "spool"),
        ack_durability="replicated",
        ack_replicas=2,
        ack_timeout_s=0.1,
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    writer = app[WRITER]
    for n in range(40):
        assert await writer.write(event(300 + n)) is None
    ready = await client.get("/readyz")
    assert ready.status == 200
    state = await ready.json()
    assert state["spooling"] is True
    assert state["spool_depth"] >= 30
    with joining(master, tmp_path / "second"):
        await await_for(lambda: not writer.spooling, timeout_s=20)
        assert (await (await client.get("/readyz")).json())["spool_depth"] == 0
    queued_once(master.url, [f"evt-atk-{300 + n}" for n in range(40)])


async def test_fsynced_is_refused_where_the_fsync_policy_cannot_be_read(tmp_path: Path) -> None:
    # A broker that refuses CONFIG (managed services) may run everysec, under which WAITAOF
    # confirms writes not yet on disk (redis/redis#13793): fsynced only on the operator's word.
    renamed = ("--rename-command", "CONFIG", "")
    with RedisServer(tmp_path / "a", appendfsync="everysec", extra_args=renamed) as server:
        client = AsyncRedis.from_url(server.url)
        publishing = Publisher(
            client, clock=CLOCK, dedup_ttl_s=3600, batch_max=16, timeout_s=1,
            ack=AckRule("fsynced", 0, 1.0),
        )  # fmt: skip
        try:
            with pytest.raises(AckConfigError, match="CALHOOK_ACK_ASSUME_FSYNC_ALWAYS=true"):
                await publishing.start()
        finally:
            await publishing.close()
            await client.aclose()
    with RedisServer(tmp_path / "b", appendfsync="always", extra_args=renamed) as server:
        client = AsyncRedis.from_url(server.url)
        vouched = Publisher(
            client, clock=CLOCK, dedup_ttl_s=3600, batch_max=16, timeout_s=1,
            ack=AckRule("fsynced", 0, 1.0, assume_always=True),
        )  # fmt: skip
        try:
            await vouched.start()
            assert await vouched.publish(event(399)) is None
        finally:
            await vouched.close()
            await client.aclose()


async def test_fsynced_checks_the_broker_again_after_a_restart(tmp_path: Path) -> None:
    # Checked once at start, a broker restarted (or failed over to) with everysec would be
    # trusted: its empty script cache now has the acknowledgement checked again.
    server = RedisServer(tmp_path, appendfsync="always")
    with server:
        client = AsyncRedis.from_url(server.url)
        publishing = Publisher(
            client, clock=CLOCK, dedup_ttl_s=3600, batch_max=16, timeout_s=1,
            ack=AckRule("fsynced", 0, 1.0),
        )  # fmt: skip
        await publishing.start()
        try:
            assert await publishing.publish(event(400)) is None
            # When the broker comes back from a restart configured with everysec
            server.appendfsync = "everysec"
            server.restart()
            # Then no fsynced answer is given (a refused batch goes to the spool). The first
            # publish finds its pooled connection dead: a ConnectionError, also refused.
            answered = []
            for n in range(401, 404):
                with contextlib.suppress(PublishError):
                    answered.append(await publishing.publish(event(n)))
            assert answered == []
        finally:
            await publishing.close()
            await client.aclose()
