"""A whole pipeline of real processes on a Redis of its own, for fault injection.

Redis (AOF on, restartable on the same port and folder), the ingress app in this process (with
its spool), and ``calhook worker`` / ``calhook scheduler`` child processes that can be killed.
What happened to each event is read where calhook keeps it: the state of each of its pairs
(``PairStore.states``), and the runs and effects the test handlers record
(:mod:`tests.support.recording`, :mod:`tests.support.chaos`).

:func:`sentinel_rig` runs the same pipeline on a Sentinel topology (``REDIS_URL`` a
``redis+sentinel://`` URL for every process). A rig started with an *outside* Redis has the
handlers record their runs and effects there, as an outside system would: a broker that crashes
or fails over rolls back what it had not persisted or replicated, and effects recorded in it
would roll back with it, hiding a run applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from calhook.redis_server import RedisServer
from calhook.sentinel_cluster import SentinelCluster
from calhook.settings import Settings, load_settings
from calhook.store.connect import pair_store, sync_client
from calhook.store.keys import DUE, OPEN_STATES, event_key, pairs_key
from calhook.store.pairs import PairState, PairStore
from ingest import create_app
from tests.conftest import SECRET
from tests.support.recording import (
    EFFECT_AT_KEY,
    EFFECTS_KEY,
    OUTSIDE_URL_ENV,
    RUN_LOG_KEY,
    RUNS_KEY,
)
from tests.support.worker import TEST_HANDLER_MODULES, SchedulerProcess, WorkerProcess

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
HANDLER_MODULES = f"{TEST_HANDLER_MODULES},tests.support.chaos"
# ``Rig.redis`` hides the module's name in the class body.
SyncRedis = redis.Redis
# Short enough that a killed worker's work comes back within the test: its leases run out after
# CALHOOK_LEASE_S, and a message lost in transit is looked for after CALHOOK_RECOVERY_S.
FAULT_ENV = {
    "CALHOOK_HANDLER_MODULES": HANDLER_MODULES,
    "CALHOOK_TASK_TIME_LIMIT_S": "4",
    "CALHOOK_VISIBILITY_TIMEOUT_S": "6",
    "CALHOOK_RECOVERY_S": "2",
    "CALHOOK_LEASE_S": "3",
}
# The settings the ingress shares with the workers (its accept script watches the dispatch).
_SHARED = (
    "CALHOOK_RECOVERY_S",
    "CALHOOK_LEASE_S",
    "CALHOOK_TASK_TIME_LIMIT_S",
    "CALHOOK_VISIBILITY_TIMEOUT_S",
)


@dataclass
class Rig:
    """The processes of one fault-injection test.

    ``server`` is the broker Redis; on a Sentinel rig, the first master (roles change on
    failover: ``cluster`` knows the current one, and :attr:`url` follows it). ``outside``, when
    there is one, holds what the test handlers record.
    """

    root: Path
    server: RedisServer
    settings: Settings
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)
    schedulers: list[SchedulerProcess] = field(default_factory=list)
    client: TestClient[Any, Any] | None = None
    app: web.Application | None = None
    cluster: SentinelCluster | None = None
    outside: RedisServer | None = None

    @property
    def url(self) -> str:
        """The ``REDIS_URL`` of every process of the rig."""
        return self.cluster.url if self.cluster is not None else self.server.url

    @functools.cached_property
    def redis(self) -> redis.Redis:
        """A client on the broker (through the sentinels, to the current master, on a Sentinel
        rig)."""
        return sync_client(self.url)

    @functools.cached_property
    def recorded(self) -> SyncRedis:
        """A client on where the test handlers record runs and effects (the broker without an
        outside Redis)."""
        return redis.Redis.from_url(self.outside.url) if self.outside else self.redis

    @functools.cached_property
    def pairs(self) -> PairStore:
        """The pair store on the rig's Redis, with the rig's timings."""
        return pair_store(self.redis, self.settings)

    def start_worker(
        self, concurrency: int = 2, queues: str | None = None, **env: str
    ) -> WorkerProcess:
        """A ``calhook worker`` on every queue (or on ``queues``, comma-separated)."""
        n = len(self.workers)
        worker = WorkerProcess(
            self.url, self.root / f"worker-{n}.log", concurrency, **{**self.env, **env}
        )
        if queues is not None:
            worker.args = ["worker", "-Q", queues, "-c", str(concurrency)]
        self.workers.append(worker)
        worker.start()
        return worker

    def start_scheduler(self) -> SchedulerProcess:
        log = self.root / f"scheduler-{len(self.schedulers)}.log"
        scheduler = SchedulerProcess(self.url, log, **self.env)
        self.schedulers.append(scheduler)
        scheduler.start()
        return scheduler

    def alive_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.process is not None and w.process.poll() is None]

    def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL the worker and its pool: no ack, no requeue, no finish recorded."""
        assert worker.process is not None
        worker.signal(signal.SIGKILL)
        worker.process.wait()

    def kill_workers(self) -> None:
        for worker in self.alive_workers():
            self.kill(worker)

    def worker_of(self, pid: int) -> WorkerProcess:
        """The worker whose pool holds process ``pid`` (each worker is a process group)."""
        group = os.getpgid(pid)
        [worker] = [w for w in self.alive_workers() if w.process and w.process.pid == group]
        return worker

    async def post(self, event_type: str, data: dict[str, Any], n: int) -> str:
        assert self.client is not None
        envelope = {"type": event_type, "created": "2025-06-01 12:00:00", "data": {**data, "n": n}}
        body = orjson.dumps(envelope)
        answer = await self.client.post("/webhooks/calenso", data=body, headers=AUTH)
        assert answer.status == 202, await answer.text()
        return str((await answer.json())["event_id"])

    async def send(self, event_type: str, data: dict[str, Any], n: int) -> tuple[int, str]:
        """Post like :meth:`post`, whatever the answer: its status, and the event id of a 202
        (else the answer's text)."""
        assert self.client is not None
        envelope = {"type": event_type, "created": "2025-06-01 12:00:00", "data": {**data, "n": n}}
        answer = await self.client.post(
            "/webhooks/calenso", data=orjson.dumps(envelope), headers=AUTH
        )
        if answer.status == 202:
            return answer.status, str((await answer.json())["event_id"])
        return answer.status, await answer.text()

    def lines(self, msg: str) -> list[dict[str, Any]]:
        """The log lines ``msg`` of every worker and scheduler the rig started."""
        processes: list[WorkerProcess | SchedulerProcess] = [*self.workers, *self.schedulers]
        return [line for p in processes for line in p.lines() if line.get("msg") == msg]

    def counts(self, key: str, client: SyncRedis | None = None) -> Counter[str]:
        """The counts of hash ``key`` on the broker (or on ``client``)."""
        raw: dict[bytes, bytes] = (client or self.redis).hgetall(key)  # type: ignore[assignment]
        return Counter({k.decode(): int(v) for k, v in raw.items()})

    def effects(self) -> Counter[str]:
        return self.counts(EFFECTS_KEY, self.recorded)

    def runs(self) -> Counter[str]:
        return self.counts(RUNS_KEY, self.recorded)

    def run_starts(self) -> dict[str, list[float]]:
        """When each run of each pair began (wall clock, in the order they began)."""
        starts: dict[str, list[float]] = {}
        entries: list[bytes] = self.recorded.lrange(RUN_LOG_KEY, 0, -1)  # type: ignore[assignment]
        for entry in entries:
            pair, at = entry.decode().rsplit(" ", 1)
            starts.setdefault(pair, []).append(float(at))
        return starts

    def effect_times(self) -> list[float]:
        """When each effect applied (wall clock, ascending); recorded on an outside Redis only."""
        assert self.outside is not None, "effect times are recorded on an outside Redis only"
        scored: list[tuple[bytes, float]] = self.recorded.zrange(  # type: ignore[assignment]
            EFFECT_AT_KEY, 0, -1, withscores=True
        )
        return [float(at) for _, at in scored]

    def states(self, event_id: str) -> dict[str, PairState]:
        return self.pairs.states(event_id)

    def state(self, event_id: str, pair: str) -> str | None:
        """One pair's state, None before it exists."""
        value = self.redis.hget(event_key(event_id), f"{pair}/s")
        return value.decode() if isinstance(value, bytes) else None

    def all_in(self, ids: Iterable[str], pair: str, *states: str) -> bool:
        """Whether ``pair`` of every event is in one of ``states``."""
        with self.redis.pipeline(transaction=False) as pipe:
            for event_id in ids:
                pipe.hget(event_key(event_id), f"{pair}/s")
            found = pipe.execute()
        wanted = {s.encode() for s in states}
        return all(value in wanted for value in found)

    def open_pairs(self) -> Counter[str]:
        """How many pairs are queued, running and waiting (the store's own counters)."""
        counts: Counter[str] = Counter()
        for state in OPEN_STATES:
            counts[state] = sum(self.counts(pairs_key(state)).values())
        return counts

    def quiet(self, ids: Iterable[str]) -> bool:
        """Every event of ``ids`` is in Redis (the spool has drained), and no pair of any event
        is open: every state change is one script, so the counters never show a half-move."""
        with self.redis.pipeline(transaction=False) as pipe:
            for event_id in ids:
                pipe.exists(event_key(event_id))
            stored = pipe.execute()
        return all(stored) and sum(self.open_pairs().values()) == 0 and self.redis.zcard(DUE) == 0


@contextlib.asynccontextmanager
async def rig(root: Path, **env: str) -> AsyncIterator[Rig]:
    """Start Redis and the ingress; stop everything (the rig's processes) at the end.

    ``env`` overrides :data:`FAULT_ENV` for the workers and the scheduler; the timings the
    ingress shares with them are given to its settings too.
    """
    async with redis_rig(root, env=env) as the_rig:
        yield the_rig


@contextlib.asynccontextmanager
async def redis_rig(
    root: Path,
    *,
    appendfsync: Literal["always", "everysec", "no"] = "everysec",
    outside: bool = False,
    ingress: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Rig]:
    """:func:`rig`, with the Redis's ``appendfsync``; ``outside``: the handlers record in a
    Redis of their own (see the module docstring); ``ingress``: more settings of the ingress
    (``ack_durability=...``)."""
    server = RedisServer(root / "redis", appendfsync=appendfsync)
    with contextlib.ExitStack() as stack:
        server.start()
        stack.callback(server.stop)
        async with _running(root, server, None, outside, ingress, env or {}, stack) as the_rig:
            yield the_rig


@contextlib.asynccontextmanager
async def sentinel_rig(
    root: Path,
    *,
    replicas: int = 1,
    down_after_ms: int = 1000,
    stopped_sentinels: Iterable[int] = (),
    outside: bool = True,
    ingress: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Rig]:
    """Like :func:`redis_rig`, on a master, ``replicas`` replicas and three sentinels: every
    process's ``REDIS_URL`` is the cluster's ``redis+sentinel://`` URL. ``stopped_sentinels`` are
    stopped once the topology is up, before the ingress and any worker starts (the URL still
    names them). The handlers record in an outside Redis unless told otherwise.
    """
    cluster = SentinelCluster(root / "sentinel", replicas=replicas, down_after_ms=down_after_ms)
    with contextlib.ExitStack() as stack:
        await asyncio.to_thread(cluster.start)
        stack.callback(cluster.stop)
        for index in stopped_sentinels:
            cluster.stop_sentinel(index)
        server = cluster.servers[0]
        async with _running(root, server, cluster, outside, ingress, env or {}, stack) as r:
            yield r


@contextlib.asynccontextmanager
async def _running(
    root: Path,
    server: RedisServer,
    cluster: SentinelCluster | None,
    outside: bool,
    ingress: dict[str, Any] | None,
    env: dict[str, str],
    stack: contextlib.ExitStack,
) -> AsyncIterator[Rig]:
    """The ingress on the broker ``server`` (or ``cluster``), and the rig around it; ``stack``
    stops the servers after the rig's processes."""
    env = {**FAULT_ENV, **env}
    outside_server = None
    if outside:
        outside_server = RedisServer(root / "outside")
        outside_server.start()
        stack.callback(outside_server.stop)
        env[OUTSIDE_URL_ENV] = outside_server.url
    url = cluster.url if cluster is not None else server.url
    settings = load_settings(
        redis_url=url,
        auth_secrets=SECRET,
        spool_dir=str(root / "spool"),
        **{name.removeprefix("CALHOOK_").lower(): env[name] for name in _SHARED},
        **(ingress or {}),
    )
    the_rig = Rig(root, server, settings, env, cluster=cluster, outside=outside_server)
    the_rig.app = create_app(settings)
    try:
        async with TestClient(TestServer(the_rig.app)) as client:
            the_rig.client = client
            yield the_rig
    finally:
        for worker in the_rig.workers:
            worker.stop(timeout_s=30)
        for scheduler in the_rig.schedulers:
            scheduler.stop()
        for client_name in ("redis", "recorded"):
            if client_name in vars(the_rig):
                getattr(the_rig, client_name).close()


async def gather_posts(the_rig: Rig, event_type: str, data: dict[str, Any], n: int) -> list[str]:
    """Post ``n`` distinct events at once; return their ids in post order."""
    return list(await asyncio.gather(*(the_rig.post(event_type, data, i) for i in range(n))))
