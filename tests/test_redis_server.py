"""The embedded servers of calhook.redis_server: one server's crash recovery from its AOF, and a
Sentinel topology (master, replica, three sentinels) that fails over for real. Real processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.sentinel

from calhook.redis_server import RedisServer, RedisServerError
from calhook.sentinel_cluster import SentinelCluster
from tests.support.waiting import wait_for

HOST = "127.0.0.1"
FAILOVER_BOUND_S = 30.0
# redis-py leaves its Sentinel client untyped.
Sentinel: Any = redis.sentinel.Sentinel


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    """A running cluster with the defaults: one replica, three sentinels, quorum 2."""
    with SentinelCluster(tmp_path / "sentinel") as running:
        yield running


def client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=5)


def role(port: int) -> list[object] | None:
    """The server's ROLE reply, or None while it does not answer."""
    try:
        with client(port) as conn:
            reply: list[object] = conn.execute_command("ROLE")
            return reply
    except redis.ConnectionError:
        return None


def in_sync_with(port: int, master: tuple[str, int]) -> bool:
    """Whether the server at ``port`` replicates ``master`` with its link up."""
    reply = role(port)
    return (
        reply is not None
        and reply[:3] == ["slave", master[0], master[1]]
        and (reply[3] == "connected")
    )


def test_restart_after_sigkill_keeps_writes_acknowledged_with_appendfsync_always(
    tmp_path: Path,
) -> None:
    # Given a server that fsyncs its AOF on every write, and writes it acknowledged
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    try:
        with client(server.port) as conn:
            for n in range(200):
                conn.set(f"k{n}", n)
        port, pid = server.port, server.pid

        # When it dies without a chance to flush, and comes back on its data dir
        server.stop(kill=True)
        assert not server.running
        server.restart()

        # Then every acknowledged write is there again, on the same port
        assert (server.port, server.running) == (port, True)
        assert server.pid != pid
        with client(server.port) as conn:
            assert conn.dbsize() == 200
            assert conn.get("k199") == "199"
    finally:
        server.stop()


def test_a_server_that_exits_at_start_names_its_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", extra_args=["--no-such-option", "yes"])

    with pytest.raises(RedisServerError, match=r"exited with 1; see .*server\.log"):
        server.start()


def test_a_cluster_not_ready_in_time_stops_everything_and_says_what_is_missing(
    tmp_path: Path,
) -> None:
    # Given a cluster that gets less time than its sentinels need to find each other (2 s hellos)
    cluster = SentinelCluster(tmp_path / "sentinel")

    with pytest.raises(RedisServerError, match=r"not ready after 0.2s: .*(see .*server\.log)"):
        cluster.start(timeout_s=0.2)

    assert not any(process.running for process in [*cluster.servers, *cluster.sentinels])


def test_every_sentinel_knows_the_master_the_replica_and_the_others(
    cluster: SentinelCluster,
) -> None:
    master, replica = cluster.servers
    assert cluster.master() == (HOST, master.port)
    assert cluster.master_url == master.url
    hosts = ",".join(f"{HOST}:{port}" for port in cluster.sentinel_ports)
    assert cluster.url == f"redis+sentinel://{hosts}/mymaster/0"
    assert len(set(cluster.sentinel_ports) | {master.port, replica.port}) == 5

    for port in cluster.sentinel_ports:
        with client(port) as sentinel:
            assert sentinel.sentinel_get_master_addr_by_name("mymaster") == (HOST, master.port)
            others = sentinel.sentinel_sentinels("mymaster")
            replicas = sentinel.sentinel_slaves("mymaster")
        assert sorted(other["port"] for other in others) == sorted(
            p for p in cluster.sentinel_ports if p != port
        )
        assert [(r["port"], r["master-link-status"]) for r in replicas] == [(replica.port, "ok")]

    # A client that knows only the sentinels finds both servers through them
    finder = Sentinel([(HOST, port) for port in cluster.sentinel_ports])
    assert finder.discover_master("mymaster") == (HOST, master.port)
    assert finder.discover_slaves("mymaster") == [(HOST, replica.port)]


def test_a_write_to_the_master_shows_up_on_the_replica(cluster: SentinelCluster) -> None:
    replica = cluster.servers[1]
    with redis.Redis.from_url(cluster.master_url, decode_responses=True) as master:
        master.set("booking", "confirmed")
        assert master.execute_command("WAIT", 1, 5000) == 1

    with client(replica.port) as conn:
        wait_for(lambda: conn.get("booking") == "confirmed", 5, "the write on the replica")
        with pytest.raises(redis.ReadOnlyError):
            conn.set("booking", "cancelled")


def test_sigkill_of_the_master_promotes_the_replica(cluster: SentinelCluster) -> None:
    # Given a write every replica acknowledged
    old = cluster.master()
    with redis.Redis.from_url(cluster.master_url, decode_responses=True) as master:
        master.set("booking", "confirmed")
        assert master.execute_command("WAIT", 1, 5000) == 1

    # When the master dies without a word
    started = time.monotonic()
    killed = cluster.kill_master()
    new = cluster.wait_for_failover(old, timeout_s=FAILOVER_BOUND_S)
    took = time.monotonic() - started

    # Then the replica is the master, for the sentinels and for itself, with the write
    print(f"failover after SIGKILL of the master: {took:.2f}s")
    assert took < FAILOVER_BOUND_S
    assert killed.port == old[1]
    assert not killed.running
    assert new == (HOST, cluster.servers[1].port)
    assert cluster.master() == new
    with redis.Redis.from_url(cluster.master_url, decode_responses=True) as master:
        assert master.get("booking") == "confirmed"
        master.set("after", "failover")


def test_the_cluster_answers_with_the_first_sentinel_down_and_it_comes_back(
    cluster: SentinelCluster,
) -> None:
    master = (HOST, cluster.servers[0].port)

    cluster.stop_sentinel(0)

    assert not cluster.sentinels[0].running
    assert cluster.master() == master  # from the second sentinel
    assert cluster.url.startswith(f"redis+sentinel://{HOST}:{cluster.sentinel_ports[0]},")

    cluster.start_sentinel(0)

    with client(cluster.sentinel_ports[0]) as sentinel:
        assert sentinel.sentinel_get_master_addr_by_name("mymaster") == master
        # It read back the config it rewrote: the others are known without a new hello.
        assert len(sentinel.sentinel_sentinels("mymaster")) == 2
    assert "sentinel known-sentinel" in cluster.sentinels[0].config_file.read_text()


@pytest.mark.slow
def test_a_killed_master_restarted_rejoins_as_a_replica_of_the_new_one(
    cluster: SentinelCluster,
) -> None:
    # Given a failover after a SIGKILL of the master
    old = cluster.master()
    killed = cluster.kill_master()
    new = cluster.wait_for_failover(old, timeout_s=FAILOVER_BOUND_S)
    with redis.Redis.from_url(cluster.master_url, decode_responses=True) as master:
        master.set("written", "while it was down")

    # When the old master comes back on its port and data (it starts as a master, alone)
    started = time.monotonic()
    killed.restart()

    # Then the sentinels turn it into a replica of the new master, which it catches up with
    wait_for(lambda: in_sync_with(killed.port, new), FAILOVER_BOUND_S, "the old master's rejoin")
    print(f"old master back as a replica: {time.monotonic() - started:.2f}s after restart")
    with client(killed.port) as conn:
        assert conn.get("written") == "while it was down"
    assert cluster.master() == new
    for port in cluster.sentinel_ports:
        with client(port) as sentinel:
            replicas = sentinel.sentinel_slaves("mymaster")
        assert [r["port"] for r in replicas if r["is_slave"] and not r["is_sdown"]] == [old[1]]
