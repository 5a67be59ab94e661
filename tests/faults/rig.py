"""A whole pipeline of real processes on a Redis of its own, for fault injection.

Redis (AOF on, restartable on the same port and folder), the ingress app in this process (with
its spool), and ``calhook worker`` / ``calhook scheduler`` child processes that can be killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from calhook.redis_server import RedisServer
from calhook.settings import load_settings
from ingest import create_app
from tests.conftest import SECRET
from tests.support.recording import EFFECTS_KEY, RUNS_KEY
from tests.support.worker import SchedulerProcess, WorkerProcess

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
# Short enough that a killed worker's unacked tasks come back within the test.
FAULT_ENV = {
    "CALHOOK_TASK_TIME_LIMIT_S": "4",
    "CALHOOK_VISIBILITY_TIMEOUT_S": "6",
    "CALHOOK_WATCHDOG_S": "15",
}


@dataclass
class Rig:
    """The processes of one fault-injection test."""

    root: Path
    server: RedisServer
    workers: list[WorkerProcess] = field(default_factory=list)
    scheduler: SchedulerProcess | None = None
    client: TestClient[Any, Any] | None = None
    app: web.Application | None = None

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url)

    def start_worker(self, concurrency: int = 2, **env: str) -> WorkerProcess:
        n = len(self.workers)
        worker = WorkerProcess(
            self.server.url, self.root / f"worker-{n}.log", concurrency, **{**FAULT_ENV, **env}
        )
        self.workers.append(worker)
        worker.start()
        return worker

    def start_scheduler(self) -> None:
        self.scheduler = SchedulerProcess(self.server.url, self.root / "scheduler.log", **FAULT_ENV)
        self.scheduler.start()

    def kill_workers(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.signal(signal.SIGKILL)
                worker.process.wait()

    async def post(self, event_type: str, data: dict[str, Any], n: int) -> str:
        assert self.client is not None
        body = orjson.dumps({"type": event_type, "created": "2025-06-01 12:00:00",
                             "data": {**data, "n": n}})  # fmt: skip
        answer = await self.client.post("/webhooks/calenso", data=body, headers=AUTH)
        assert answer.status == 202, await answer.text()
        return str((await answer.json())["event_id"])

    def counts(self, key: str) -> Counter[str]:
        raw: dict[bytes, bytes] = self.redis.hgetall(key)  # type: ignore[assignment]
        return Counter({k.decode(): int(v) for k, v in raw.items()})

    def effects(self) -> Counter[str]:
        return self.counts(EFFECTS_KEY)

    def runs(self) -> Counter[str]:
        return self.counts(RUNS_KEY)


@contextlib.asynccontextmanager
async def rig(root: Path) -> AsyncIterator[Rig]:
    """Start Redis and the ingress; stop everything (the rig's processes) at the end."""
    server = RedisServer(root / "redis")
    server.start()
    settings = load_settings(
        redis_url=server.url,
        auth_secrets=SECRET,
        spool_dir=str(root / "spool"),
        task_time_limit_s=4,
        visibility_timeout_s=6,
        watchdog_s=15,
    )
    the_rig = Rig(root, server)
    the_rig.app = create_app(settings)
    try:
        async with TestClient(TestServer(the_rig.app)) as client:
            the_rig.client = client
            yield the_rig
    finally:
        for worker in the_rig.workers:
            worker.stop(timeout_s=30)
        if the_rig.scheduler is not None:
            the_rig.scheduler.stop()
        server.stop()


async def gather_posts(the_rig: Rig, event_type: str, data: dict[str, Any], n: int) -> list[str]:
    """Post ``n`` distinct events at once; return their ids in post order."""
    return list(await asyncio.gather(*(the_rig.post(event_type, data, i) for i in range(n))))
