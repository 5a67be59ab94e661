"""Every client calhook makes from a ``redis+sentinel://`` URL follows the master through a
failover, and finds it while the first sentinel of the URL is down (real servers and sentinels:
calhook.redis_server.SentinelCluster).

The whole pipeline through a failover under load, workers included, is in
tests/faults/test_failover.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from calhook.sentinel_cluster import SentinelCluster
from calhook.settings import load_settings
from calhook.store.connect import async_client, async_twin, celery_broker, sync_client
from ingest import create_app
from ingest.app import WRITER
from tests.conftest import SECRET
from tests.support.waiting import await_for, wait_for
from tests.support.worker import SchedulerProcess, WorkerProcess

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    with SentinelCluster(tmp_path / "sentinel") as running:
        yield running


def body(n: int) -> bytes:
    return (
        b'{"type": "customer.created", "created": "2026-12-01 10:00:00", '
        b'"data": {"customer": {"uuid": "c%d"}}}' % n
    )


def _writes(client: redis.Redis, key: str) -> bool:
    try:
        return bool(client.incr(key))
    except redis.RedisError:
        return False


async def test_every_client_follows_the_master_through_a_failover(
    cluster: SentinelCluster, tmp_path: Path
) -> None:
    url = cluster.url
    sync = sync_client(url, socket_timeout=2, socket_connect_timeout=2)
    pooled = async_client(url, blocking=True, max_connections=4, timeout=5, socket_timeout=2)
    twin = async_twin(sync)
    broker, options = celery_broker(url)
    settings = load_settings(redis_url=url, auth_secrets=SECRET, spool_dir=str(tmp_path / "spool"))
    app = create_app(settings)
    async with TestClient(TestServer(app)) as ingress:
        # Before: each reaches the first master.
        assert (await ingress.post("/webhooks/calenso", data=body(1), headers=AUTH)).status == 202
        sync.set("before", 1)
        await pooled.set("pooled", 1)
        await twin.set("twin", 1)
        with kombu.Connection(broker, transport_options=options) as conn:
            conn.SimpleQueue("sentinel-test").put({"n": 1})

        old = cluster.master()
        cluster.kill_master()
        killed = time.monotonic()
        # During: the ingress still answers 202 (the spool takes what Redis does not).
        during = await ingress.post("/webhooks/calenso", data=body(2), headers=AUTH)
        assert during.status == 202
        new = cluster.wait_for_failover(old)
        assert new != old

        # After: the same client objects write to the new master, without being remade.
        wait_for(lambda: _writes(sync, "after"), timeout_s=30, what="sync client on new master")
        print(f"sync client writes again {time.monotonic() - killed:.1f} s after the kill")
        await _until_written(pooled)
        await _until_written(twin)
        writer = app[WRITER]
        await await_for(lambda: not writer.spooling, timeout_s=30, what="spool drained")
        after = await ingress.post("/webhooks/calenso", data=body(3), headers=AUTH)
        assert after.status == 202
        new_master = redis.Redis(host=new[0], port=new[1])
        # What was written before the kill was replicated (an idle second passed since).
        assert new_master.get("before") == b"1"
        assert new_master.llen("dispatch") >= 2
        # kombu (Celery's transport) finds the queue on the new master.
        with kombu.Connection(broker, transport_options=options) as conn:
            message = conn.SimpleQueue("sentinel-test").get(timeout=10)
            assert message.payload == {"n": 1}
            message.ack()
        new_master.close()
    sync.close()
    await pooled.aclose()
    await twin.aclose()


async def _until_written(client: redis.asyncio.Redis, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await asyncio.wait_for(client.incr("async"), 3)
            return
        except (redis.RedisError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_the_first_sentinel_down_is_skipped(cluster: SentinelCluster, tmp_path: Path) -> None:
    cluster.stop_sentinel(0)
    url = cluster.url  # still names the stopped sentinel first, as a client's setting would
    assert str(cluster.sentinel_ports[0]) in url.split(",")[0]
    sync = sync_client(url, socket_timeout=2)
    assert sync.set("k", 1)
    aclient = async_client(url)
    assert await aclient.get("k") == b"1"
    await aclient.aclose()
    broker, options = celery_broker(url)
    with kombu.Connection(broker, transport_options=options) as conn:
        queue = conn.SimpleQueue("first-down")
        queue.put({"ok": True})
        message = queue.get(timeout=5)
        assert message.payload == {"ok": True}
        message.ack()
    sync.close()


def _handled(worker: WorkerProcess, event_id: str) -> bool:
    return any(
        line.get("msg") == "handler done"
        and line.get("handler") == "record"
        and line.get("event_id") == event_id
        for line in worker.lines()
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_worker_follows_a_failover_by_hand_without_a_restart(
    cluster: SentinelCluster, tmp_path: Path
) -> None:
    # SENTINEL FAILOVER turns the master into a replica while the worker waits on it in BRPOP:
    # the server unblocks it, and the worker must find the new master on its own.
    worker = WorkerProcess(cluster.url, tmp_path / "worker.log", 2)
    worker.start()
    scheduler = SchedulerProcess(cluster.url, tmp_path / "scheduler.log")
    scheduler.start()
    settings = load_settings(
        redis_url=cluster.url,
        auth_secrets=SECRET,
        spool_dir=str(tmp_path / "spool"),
        ack_durability="replicated",
    )
    try:
        async with TestClient(TestServer(create_app(settings))) as ingress:

            async def post(n: int) -> str:
                answer = await ingress.post("/webhooks/calenso", data=body(n), headers=AUTH)
                assert answer.status == 202
                return str((await answer.json())["event_id"])

            first = await post(10)
            wait_for(lambda: _handled(worker, first), timeout_s=30, what="handled before")

            old = cluster.master()
            sentinel = redis.Redis(port=cluster.sentinel_ports[0], protocol=2)
            assert sentinel.execute_command("SENTINEL", "FAILOVER", cluster.master_name)  # type: ignore[no-untyped-call]
            sentinel.close()
            cluster.wait_for_failover(old)
            switched = time.monotonic()

            second = await post(11)
            wait_for(lambda: _handled(worker, second), timeout_s=60, what="handled after")
            print(f"handled {time.monotonic() - switched:.1f} s after the switch")
            assert worker.process is not None
            assert worker.process.poll() is None, "the worker exited"
            # The sentinels turn the old master into a replica of the new one.
            old_master = redis.Redis(host=old[0], port=old[1], protocol=2)
            wait_for(lambda: old_master.execute_command("ROLE")[0] == b"slave", timeout_s=30)  # type: ignore[no-untyped-call]
            old_master.close()
    finally:
        worker.stop()
        scheduler.stop()
