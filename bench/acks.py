"""Acknowledgement levels: what each CALHOOK_ACK_DURABILITY costs the ingress (issue 13).

Each level gets its own ``calhook serve`` (one process pinned to core 0, as in bench/ingress.py)
and its own fresh Redis (the embedded Valkey, which has WAITAOF), pinned with wrk and
bench.loadgen to core 1. Rounds interleave the levels, so they see the same machine at nearly
the same time and the ratios to ``written`` are taken within one run. At each point: saturation
(wrk) or a fixed offered rate (bench.loadgen); then, from the ingress's /metrics (its admin
port), how many of the acknowledged events went to the spool because their confirmation did not
come in time, and, from Redis, how many events it holds.

An event that went to the spool still reaches Redis, through the same confirmation, and while
the spool is not empty every new event goes there too. A point whose spool has not drained a
few seconds after it ends leaves the rest behind: its ingress is restarted on a fresh spool, so
the next point measures the level again and not the spool.

The replica of ``replicated`` is a second server (AOF on, the same ``appendfsync`` as its
master) attached with ``REPLICAOF``; on this machine it shares core 1 with its master, the load
generator and the other levels' idle servers, where production would give it a host of its own.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.fixtures import fixture_bodies
from bench.ingress import SECRET, offered, wrk
from bench.loadgen import write_bodies
from bench.procs import CALHOOK, CORES, LOAD_CORE, SERVER_CORE, Child, wait_for_port
from calhook.redis_server import RedisServer, free_port
from calhook.settings import Settings
from calhook.store.keys import EVENT

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
# A level that acknowledged less than the offered rate over this factor at saturation would take
# more than this many times the point's length to answer an open-loop run, whose latency then
# only measures the queue in front of it: that point is skipped.
OFFERED_SLOWDOWN_MAX = 5.0
ACK_TIMEOUT_S = float(Settings.model_fields["ack_timeout_s"].default)


@dataclass(frozen=True, slots=True)
class Level:
    """One row of the comparison: an acknowledgement and the broker it runs against."""

    name: str
    durability: Literal["written", "fsynced", "replicated"]
    appendfsync: Literal["everysec", "always"]
    replica: bool = False

    def describe(self) -> str:
        """The row label of the report."""
        broker = f"appendfsync {self.appendfsync}"
        if self.replica:
            broker += ", 1 replica"
        return f"{self.durability} ({broker})"


LEVELS = (
    Level("written", "written", "everysec"),  # the default, and production's AOF setting
    # fsynced needs appendfsync always (ingest/acks.py): the ingress refuses it under everysec.
    Level("fsynced", "fsynced", "always"),
    # Under everysec, replicated waits for the replica only (WAIT 1); under always, also for
    # the master's disk (WAITAOF 1 0, then WAIT 1).
    Level("replicated_everysec", "replicated", "everysec", replica=True),
    Level("replicated_always", "replicated", "always", replica=True),
)


@dataclass(frozen=True, slots=True)
class Config:
    rounds: int
    seconds: float
    rate: int = 1000
    connections: int = 64
    # How long a point's spool may take to drain before its ingress is restarted.
    drain_s: float = 3.0


def _wait(ready: Callable[[], str | None], timeout_s: float) -> str | None:
    """Wait until ``ready()`` returns None (it returns what is still missing); return what is
    still missing at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (missing := ready()) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return missing


def _must(ready: Callable[[], str | None], timeout_s: float = READY_TIMEOUT_S) -> None:
    if (missing := _wait(ready, timeout_s)) is not None:
        raise RuntimeError(f"not ready after {timeout_s:g} s: {missing}")


def _pin(server: RedisServer) -> None:
    if server.pid is not None and len(CORES) > 1:
        os.sched_setaffinity(server.pid, {LOAD_CORE})


def _attach(master: RedisServer, replica: RedisServer) -> redis.Redis:
    """Make ``replica`` a replica of ``master``; return its client once the link is up."""
    # Else the master waits 5 s for more replicas to share a diskless full sync.
    redis.Redis.from_url(master.url).config_set("repl-diskless-sync-delay", 0)
    client = redis.Redis.from_url(replica.url)
    client.execute_command("REPLICAOF", HOST, master.port)  # type: ignore[no-untyped-call]

    def link() -> str | None:
        status = client.info("replication").get("master_link_status")
        return None if status == "up" else f"replica link {status}"

    _must(link)
    return client


def metrics(admin_port: int) -> dict[str, float]:
    """The ingress's figures this part reads from its /metrics: events by where they went,
    the spool's depth, publish batches and the events in them."""
    url = f"http://{HOST}:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {"spool": 0.0, "redis": 0.0, "spool_depth": 0.0, "batches": 0.0, "batched": 0.0}
    names = {
        "calhook_ingress_spool_depth": "spool_depth",
        "calhook_ingress_publish_batch_size_count": "batches",
        "calhook_ingress_publish_batch_size_sum": "batched",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "calhook_ingress_events_total":
                if (outcome := sample.labels["outcome"]) in ("spool", "redis"):
                    out[outcome] += sample.value
            elif sample.name in names:
                out[names[sample.name]] = sample.value
    return out


class Rig:
    """One level's servers and its ingress, which can be restarted on a fresh spool."""

    def __init__(self, level: Level, work: Path, stack: ExitStack) -> None:
        self.level = level
        self.work = work
        server = stack.enter_context(RedisServer(work / f"redis-{level.name}"))
        _pin(server)
        self.url = server.url
        self.master = redis.Redis.from_url(server.url)
        # Set at runtime: the bench asks nothing of RedisServer beyond a server with AOF on.
        self.master.config_set("appendfsync", level.appendfsync)
        # The AOF is rewritten between points (reset), never during one.
        self.master.config_set("auto-aof-rewrite-percentage", 0)
        self.replica: redis.Redis | None = None
        if level.replica:
            replica = stack.enter_context(RedisServer(work / f"redis-{level.name}-replica"))
            _pin(replica)
            self.replica = _attach(server, replica)
            self.replica.config_set("auto-aof-rewrite-percentage", 0)
        self.starts = 0
        self.port = self.admin_port = 0
        self._child: Child | None = None
        stack.callback(self.stop)

    def start(self) -> None:
        """Start an ingress on a spool folder of its own."""
        self.starts += 1
        self.port = free_port()
        while (admin_port := free_port()) == self.port:
            pass
        self.admin_port = admin_port
        env = {
            "REDIS_URL": self.url,
            "CALHOOK_AUTH_SECRETS": SECRET,
            "CALHOOK_SPOOL_DIR": str(self.work / f"spool-{self.level.name}-{self.starts}"),
            "CALHOOK_ACK_DURABILITY": self.level.durability,
            "CALHOOK_ACK_REPLICAS": "1",
            "CALHOOK_ADMIN_PORT": str(self.admin_port),
        }
        argv = [*CALHOOK, "serve", "--host", HOST, "--port", str(self.port)]
        name = f"acks-{self.level.name}-{self.starts}"
        self._child = Child(name, argv, env, self.work, [SERVER_CORE])
        wait_for_port(self.port, self._child.proc)
        wait_for_port(self.admin_port, self._child.proc)

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None

    def settle(self, before: dict[str, float], drain_s: float) -> dict[str, Any]:
        """After a point: its spooled, stored and left-over events, and its batches.

        Waits up to ``drain_s`` for the requests still in flight when the load stopped to be
        answered and for the spool to drain, i.e. for Redis to hold every event acknowledged.
        A spool still not empty then is left behind with its ingress (see the module).
        """
        after = before

        def stored() -> str | None:
            nonlocal after
            after = metrics(self.admin_port)
            acked = after["spool"] + after["redis"] - before["spool"] - before["redis"]
            held = self.events_in_redis()
            if after["spool_depth"] == 0 and held == acked:
                return None
            return f"{held} events in Redis of {acked:.0f} acknowledged"

        _wait(stored, drain_s)
        batches = after["batches"] - before["batches"]
        spooled, written = (after[k] - before[k] for k in ("spool", "redis"))
        figures = {
            "acked_events": int(spooled + written),
            "spooled": int(spooled),
            "left_in_spool": int(after["spool_depth"]),
            "in_redis": self.events_in_redis(),
            "batch_mean": (after["batched"] - before["batched"]) / batches if batches else 0.0,
        }
        if figures["left_in_spool"]:
            self.stop()
            self.start()
        return figures

    def events_in_redis(self) -> int:
        """The events the master holds (one state hash each)."""
        return sum(1 for _ in self.master.scan_iter(match=f"{EVENT}*", count=1000))

    def reset(self) -> None:
        """Empty the servers and their AOF, so each point starts alike."""
        self.master.flushall()
        servers = [self.master]
        if (replica := self.replica) is not None:
            offset = int(self.master.info("replication")["master_repl_offset"])

            def caught_up() -> str | None:
                seen = int(replica.info("replication")["slave_repl_offset"])
                return None if seen >= offset else f"replica at offset {seen} of {offset}"

            _must(caught_up)
            servers.append(replica)
        for server in servers:
            server.bgrewriteaof()
        for server in servers:

            def rewritten(server: redis.Redis = server) -> str | None:
                info = server.info("persistence")
                busy = info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]
                return "an AOF rewrite runs" if busy else None

            _must(rewritten)


@contextmanager
def rigs(work: Path) -> Iterator[dict[str, Rig]]:
    """Every level's servers and ingress, running."""
    with ExitStack() as stack:
        running = {level.name: Rig(level, work, stack) for level in LEVELS}
        for rig in running.values():
            rig.start()
        yield running


def run(config: Config, progress: Any) -> dict[str, Any]:
    """The config's figures and ``"levels": {level: {"describe": label, "saturation": [one
    dict per round], "rate_<n>": [...]}}``; a skipped fixed-rate point is ``{"skipped": why}``."""
    point_rate = f"rate_{config.rate}"
    results: dict[str, dict[str, Any]] = {
        level.name: {"describe": level.describe(), "saturation": [], point_rate: []}
        for level in LEVELS
    }
    with tempfile.TemporaryDirectory(prefix="calhook-acks-") as tmp:
        work = Path(tmp)
        bodies = write_bodies(fixture_bodies(), work / "bodies")
        with rigs(work) as running:
            for name, rig in running.items():  # warm-up: imports, caches, the scripts
                before = metrics(rig.admin_port)
                wrk(rig.port, bodies, 1, config.connections, f"warm-{name}")
                rig.settle(before, config.drain_s)
                rig.reset()
            for round_ in range(config.rounds):
                for point in ("saturation", point_rate):
                    for name, rig in running.items():
                        figure = _point(rig, point, config, work, bodies, results[name])
                        results[name][point].append(figure)
                        progress(f"acks {name:16} {point:10} round {round_ + 1}: {_line(figure)}")
    return {
        "ack_timeout_s": ACK_TIMEOUT_S,
        "rate": config.rate,
        "seconds": config.seconds,
        "connections": config.connections,
        "levels": results,
    }


def _point(
    rig: Rig, point: str, config: Config, work: Path, bodies: Path, done: dict[str, Any]
) -> dict[str, Any]:
    if point != "saturation":
        saturation = float(done["saturation"][-1]["rate"])
        if saturation * OFFERED_SLOWDOWN_MAX < config.rate:
            return {"skipped": f"{saturation:,.0f}/s at saturation"}
    before = metrics(rig.admin_port)
    if point == "saturation":
        run_id = f"{rig.level.name}-{time.time_ns()}"
        figure = wrk(rig.port, bodies, config.seconds, config.connections, run_id)
    else:
        figure = offered(rig.port, bodies, config.rate, config.seconds, work)
    figure.update(rig.settle(before, config.drain_s))
    rig.reset()
    return figure


def _line(figure: dict[str, Any]) -> str:
    if "skipped" in figure:
        return f"skipped ({figure['skipped']})"
    return (
        f"{figure['rate']:7.0f}/s p50 {figure['p50_ms']:7.2f} ms p99 {figure['p99_ms']:7.2f} ms "
        f"batch {figure['batch_mean']:5.1f} spooled {figure['spooled']} "
        f"(left {figure['left_in_spool']}) in Redis {figure['in_redis']}/"
        f"{figure['acked_events']} errors {figure['errors']}"
    )
