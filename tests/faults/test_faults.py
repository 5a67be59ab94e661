"""Fault injection on real processes: Redis down or restarted, workers killed or stopped.

Each test ends with every accepted event's handlers completed exactly once (by the ledger and by
the effects a well-behaved outside system records under ``ctx.idempotency_key``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ingest.app import WRITER
from tests.faults.rig import Rig, gather_posts, rig
from tests.support.recording import FLAKY_TYPE, SLOW_TYPE
from tests.support.waiting import await_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def lead(n: int) -> dict[str, object]:
    return {"lead": {"uuid": f"1ead0000-0000-4000-8000-{n:012d}", "email": None}}


def done_once(r: Rig, ids: list[str], handler: str) -> bool:
    effects = r.effects()
    return all(effects[f"{i}:{handler}"] == 1 for i in ids)


def ledger_completions(r: Rig, event_id: str, handler: str) -> int:
    return int(r.redis.hget(f"calhook:ledger:{event_id}", f"{handler}#done") or 0)


async def test_redis_down_500_events_are_spooled_then_all_handled_once(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.start_worker()
        r.server.stop()

        ids = []
        for n in range(0, 500, 100):
            ids += await gather_posts(r, "lead.created", lead(n), 100)
            # (gather_posts numbers its events; offset the uuids so every body is distinct)

        assert r.app is not None
        writer = r.app[WRITER]
        assert writer.spooled == 500
        assert writer.spool_depth() == 500

        r.server.start()
        await await_for(lambda: done_once(r, ids, "record"), timeout_s=180, what="all 500")

        assert writer.spool_depth() == 0
        assert {r.runs()[f"{i}:record"] for i in ids} == {1}
        assert all(ledger_completions(r, i, "audit") == 1 for i in ids)


async def test_worker_killed_mid_handlers_finishes_every_event_once(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.start_worker()
        ids = await gather_posts(r, SLOW_TYPE, {"sleep_s": 0.3}, 30)
        await await_for(lambda: sum(r.runs().values()) >= 6, what="handlers under way")

        # SIGKILL: no ack, no requeue; Redis hands the tasks out again after the visibility timeout
        r.kill_workers()
        r.start_worker()

        await await_for(lambda: done_once(r, ids, "slow"), timeout_s=120, what="every event")
        assert all(ledger_completions(r, i, "slow") == 1 for i in ids)
        reruns = sum(n - 1 for n in r.runs().values())
        # Only the runs cut by the kill ran again: at most one per child process.
        assert reruns <= 2


async def test_sigterm_lets_running_handlers_finish_and_loses_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        worker = r.start_worker(CALHOOK_SOFT_SHUTDOWN_S="5")
        ids = await gather_posts(r, SLOW_TYPE, {"sleep_s": 0.5}, 20)
        await await_for(lambda: sum(r.runs().values()) >= 4, what="handlers under way")

        assert worker.process is not None
        os.kill(worker.process.pid, signal.SIGTERM)  # what `docker stop` sends to the main process
        assert worker.process.wait(timeout=60) == 0
        r.start_worker()

        await await_for(lambda: done_once(r, ids, "slow"), timeout_s=120, what="every event")
        assert {r.runs()[f"{i}:slow"] for i in ids} == {1}, "a handler was cut and ran twice"


async def test_redis_restarted_between_the_202_and_the_dispatch_loses_nothing(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        ids = await gather_posts(r, "lead.created", lead(0), 50)
        assert r.redis.llen("dispatch") == 50

        r.server.stop()  # SIGTERM: Redis writes its append-only file and exits
        r.server.start()
        r.start_worker()

        await await_for(lambda: done_once(r, ids, "record"), timeout_s=120, what="all 50")
        assert {r.runs()[f"{i}:record"] for i in ids} == {1}


async def test_retries_survive_worker_and_scheduler_restarts(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.start_worker()  # and no scheduler yet: the first retries wait in the delayed store
        ids = await gather_posts(r, FLAKY_TYPE, {"fail_times": 2}, 20)
        await await_for(lambda: r.redis.zcard("calhook:delayed") == 20, what="20 retries")

        r.kill_workers()
        r.start_worker()
        r.start_scheduler()
        await await_for(lambda: sum(r.runs().values()) >= 30, what="second attempts under way")
        assert r.scheduler is not None
        r.scheduler.stop()
        r.start_scheduler()

        await await_for(lambda: done_once(r, ids, "flaky"), timeout_s=120, what="every event")
        assert {r.runs()[f"{i}:flaky"] for i in ids} == {3}
        assert r.redis.zcard("calhook:delayed") == 0
