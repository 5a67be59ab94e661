"""A whole pipeline of real processes on a Redis of its own, for fault injection.

Redis (AOF on, restartable on the same port and folder), the ingress app in this process (with
its spool), and ``calhook worker`` / ``calhook scheduler`` child processes that can be killed.
What happened to each event is read where calhook keeps it: the state of each of its pairs
(``PairStore.states``), and the runs and effects the test handlers record
(:mod:`tests.support.recording`, :mod:`tests.support.chaos`).
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
from typing import Any

import orjson
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from calhook.redis_server import RedisServer
from calhook.settings import Settings, load_settings
from calhook.store.connect import pair_store
from calhook.store.keys import DUE, OPEN_STATES, event_key, pairs_key
from calhook.store.pairs import PairState, PairStore
from ingest import create_app
from tests.conftest import SECRET
from tests.support.recording import EFFECTS_KEY, RUNS_KEY
from tests.support.worker import TEST_HANDLER_MODULES, SchedulerProcess, WorkerProcess

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
HANDLER_MODULES = f"{TEST_HANDLER_MODULES},tests.support.chaos"
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
    """The processes of one fault-injection test."""

    root: Path
    server: RedisServer
    settings: Settings
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)
    schedulers: list[SchedulerProcess] = field(default_factory=list)
    client: TestClient[Any, Any] | None = None
    app: web.Application | None = None

    @functools.cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url)

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
            self.server.url, self.root / f"worker-{n}.log", concurrency, **{**self.env, **env}
        )
        if queues is not None:
            worker.args = ["worker", "-Q", queues, "-c", str(concurrency)]
        self.workers.append(worker)
        worker.start()
        return worker

    def start_scheduler(self) -> SchedulerProcess:
        log = self.root / f"scheduler-{len(self.schedulers)}.log"
        scheduler = SchedulerProcess(self.server.url, log, **self.env)
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

    def lines(self, msg: str) -> list[dict[str, Any]]:
        """The log lines ``msg`` of every worker and scheduler the rig started."""
        processes: list[WorkerProcess | SchedulerProcess] = [*self.workers, *self.schedulers]
        return [line for p in processes for line in p.lines() if line.get("msg") == msg]

    def counts(self, key: str) -> Counter[str]:
        raw: dict[bytes, bytes] = self.redis.hgetall(key)  # type: ignore[assignment]
        return Counter({k.decode(): int(v) for k, v in raw.items()})

    def effects(self) -> Counter[str]:
        return self.counts(EFFECTS_KEY)

    def runs(self) -> Counter[str]:
        return self.counts(RUNS_KEY)

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
    env = {**FAULT_ENV, **env}
    server = RedisServer(root / "redis")
    server.start()
    settings = load_settings(
        redis_url=server.url,
        auth_secrets=SECRET,
        spool_dir=str(root / "spool"),
        **{name.removeprefix("CALHOOK_").lower(): env[name] for name in _SHARED},
    )
    the_rig = Rig(root, server, settings, env)
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
        if "redis" in vars(the_rig):
            the_rig.redis.close()
        server.stop()


async def gather_posts(the_rig: Rig, event_type: str, data: dict[str, Any], n: int) -> list[str]:
    """Post ``n`` distinct events at once; return their ids in post order."""
    return list(await asyncio.gather(*(the_rig.post(event_type, data, i) for i in range(n))))
