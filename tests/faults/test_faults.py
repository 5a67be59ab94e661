"""Fault injection on real processes: Redis down or restarted, workers killed or stopped, the
scheduler stopped, a message lost in transit.

Each test ends with every accepted event's pairs final in the store (``PairStore.states``) and
its handlers' effects applied exactly once (as a well-behaved outside system records them under
``ctx.idempotency_key``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from calhook.messages import read_task_message
from calhook.store.keys import (
    DEAD,
    DEAD_STATE,
    DISPATCH_PAIR,
    DONE,
    QUEUED,
    SEQ,
    STALE,
    UNACKED,
    UNACKED_INDEX,
    WAITING,
    duration_key,
)
from ingest.app import WRITER
from tests.faults.rig import Rig, gather_posts, rig
from tests.support.chaos import (
    CRASH_TYPE,
    ORDERED_HANDLER,
    ORDERED_TYPE,
    applied_versions,
    running_pid,
)
from tests.support.recording import FLAKY_TYPE, RECORD_QUEUE, SLOW_TYPE
from tests.support.waiting import await_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def lead(n: int) -> dict[str, object]:
    return {"lead": {"uuid": f"1ead0000-0000-4000-8000-{n:012d}", "email": None}}


def done_once(r: Rig, ids: list[str], handler: str) -> bool:
    effects = r.effects()
    return all(effects[f"{i}:{handler}"] == 1 for i in ids)


def logged(lines: list[dict[str, Any]], msg: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("msg") == msg]


async def test_redis_down_500_events_are_spooled_then_all_handled_once(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.start_worker()
        r.start_scheduler()
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
        await await_for(lambda: r.quiet(ids), what="every pair final")

        assert writer.spool_depth() == 0
        assert {r.runs()[f"{i}:record"] for i in ids} == {1}
        for pair in (DISPATCH_PAIR, "audit", "record"):
            assert r.all_in(ids, pair, DONE), pair


async def test_worker_killed_mid_handlers_finishes_every_event_once(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.start_worker()
        r.start_scheduler()
        ids = await gather_posts(r, SLOW_TYPE, {"sleep_s": 0.3}, 30)
        await await_for(lambda: sum(r.runs().values()) >= 6, what="handlers under way")

        # SIGKILL: no ack, no finish. The cut runs' leases run out, and the scheduler queues them.
        r.kill_workers()
        r.start_worker()

        await await_for(lambda: done_once(r, ids, "slow"), timeout_s=120, what="every event")
        await await_for(lambda: r.quiet(ids), what="every pair final")
        assert r.all_in(ids, "slow", DONE)
        reruns = sum(n - 1 for n in r.runs().values())
        # Only the runs cut by the kill ran again: at most one per child process.
        assert reruns <= 2
        # A run the kill cut counts one start of its attempt; one is far from poison.
        assert max(r.states(i)["slow"].starts for i in ids) <= 2


async def test_sigterm_lets_running_handlers_finish_and_loses_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        worker = r.start_worker(CALHOOK_SOFT_SHUTDOWN_S="5")
        r.start_scheduler()
        ids = await gather_posts(r, SLOW_TYPE, {"sleep_s": 0.5}, 20)
        await await_for(lambda: sum(r.runs().values()) >= 4, what="handlers under way")

        assert worker.process is not None
        os.kill(worker.process.pid, signal.SIGTERM)  # what `docker stop` sends to the main process
        assert worker.process.wait(timeout=60) == 0
        r.start_worker()

        await await_for(lambda: done_once(r, ids, "slow"), timeout_s=120, what="every event")
        assert {r.runs()[f"{i}:slow"] for i in ids} == {1}, "a handler was cut and ran twice"
        await await_for(lambda: r.quiet(ids), what="every pair final")


async def test_redis_restarted_between_the_202_and_the_dispatch_loses_nothing(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        ids = await gather_posts(r, "lead.created", lead(0), 50)
        assert r.all_in(ids, DISPATCH_PAIR, QUEUED)
        assert r.redis.llen("dispatch") >= 1  # one message names every event of an ingress batch

        r.server.stop()  # SIGTERM: Redis writes its append-only file and exits
        r.server.start()
        r.start_worker()
        r.start_scheduler()

        await await_for(lambda: done_once(r, ids, "record"), timeout_s=120, what="all 50")
        assert {r.runs()[f"{i}:record"] for i in ids} == {1}
        await await_for(lambda: r.quiet(ids), what="every pair final")


async def test_retries_survive_worker_and_scheduler_restarts(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.start_worker()  # and no scheduler yet: the first retries wait in their pairs' states
        ids = await gather_posts(r, FLAKY_TYPE, {"fail_times": 2}, 20)
        await await_for(lambda: r.all_in(ids, "flaky", WAITING), what="20 retries")

        r.kill_workers()
        r.start_worker()
        scheduler = r.start_scheduler()
        await await_for(lambda: sum(r.runs().values()) >= 30, what="second attempts under way")
        scheduler.stop()
        r.start_scheduler()

        await await_for(lambda: done_once(r, ids, "flaky"), timeout_s=120, what="every event")
        assert {r.runs()[f"{i}:flaky"] for i in ids} == {3}
        await await_for(lambda: r.quiet(ids), what="every pair final")
        assert {r.states(i)["flaky"].attempt for i in ids} == {3}


async def test_a_scheduler_down_longer_than_the_recovery_time_queues_each_pair_once(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        # Handler messages pile up on a queue nobody consumes, and retries come due, while no
        # scheduler runs for three times CALHOOK_RECOVERY_S.
        r.start_worker(queues="dispatch,audit")
        leads = await gather_posts(r, "lead.created", lead(0), 30)
        await await_for(lambda: r.all_in(leads, "record", QUEUED), what="a backlog on `record`")
        assert r.redis.llen(RECORD_QUEUE) == 30
        await asyncio.sleep(3 * float(r.env["CALHOOK_RECOVERY_S"]))

        # The sweep finds each backlog message still pending: no copies.
        scheduler = r.start_scheduler()
        await asyncio.sleep(3 * float(r.env["CALHOOK_RECOVERY_S"]))
        assert r.redis.llen(RECORD_QUEUE) == 30
        assert int(r.redis.hget(SEQ, RECORD_QUEUE) or 0) == 30
        assert not logged(scheduler.lines(), "recovered")
        scheduler.stop()

        # Retries come due while the scheduler is down again.
        r.start_worker()
        flaky = await gather_posts(r, FLAKY_TYPE, {"fail_times": 1}, 20)
        await await_for(lambda: r.all_in(flaky, "flaky", WAITING), what="20 retries")
        await asyncio.sleep(3 * float(r.env["CALHOOK_RECOVERY_S"]))
        assert r.all_in(flaky, "flaky", WAITING)
        scheduler = r.start_scheduler()

        ids = leads + flaky
        await await_for(lambda: done_once(r, leads, "record") and done_once(r, flaky, "flaky"))
        await await_for(lambda: r.quiet(ids), what="every pair final")
        assert {r.runs()[f"{i}:record"] for i in leads} == {1}
        assert {r.runs()[f"{i}:flaky"] for i in flaky} == {2}
        assert sum(line["queued"] for line in logged(scheduler.lines(), "due")) == 20
        assert not logged(scheduler.lines(), "recovered")


async def test_a_message_lost_between_the_queue_and_a_worker_is_queued_once_more(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        r.start_worker(queues="dispatch,audit")
        ids = await gather_posts(r, "lead.created", lead(0), 10)
        await await_for(lambda: r.all_in(ids, "record", QUEUED), what="the record messages")
        # As kombu's BRPOP does when the connection drops before it records the message as
        # unacked (RELIABILITY.md item 15): the oldest message is gone from Redis.
        assert r.redis.rpop(RECORD_QUEUE) is not None
        r.start_worker()
        scheduler = r.start_scheduler()

        await await_for(lambda: done_once(r, ids, "record"), timeout_s=60, what="all 10")
        await await_for(lambda: r.quiet(ids), what="every pair final")
        assert {r.runs()[f"{i}:record"] for i in ids} == {1}
        [recovered] = logged(scheduler.lines(), "recovered")
        assert (recovered["lost"], recovered["expired"]) == (1, 0)


async def test_a_worker_killed_while_an_ordered_handler_runs_keeps_the_entity_in_order(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        r.start_worker()
        r.start_scheduler()

        async def version(v: int, sleep_s: float = 0.0) -> str:
            return await r.post(ORDERED_TYPE, {"entity": "e1", "v": v, "sleep_s": sleep_s}, v)

        cut = await version(5, sleep_s=2.0)
        pid = await await_for(lambda: running_pid(r.redis, cut), what="v5 under way")
        older, newer = await version(3), await version(7)
        await await_for(
            lambda: r.all_in([older, newer], ORDERED_HANDLER, WAITING),
            what="v3 and v7 to wait for the entity's lock",
        )

        assert pid is not None
        r.kill(r.worker_of(pid))
        assert running_pid(r.redis, cut) == pid, "v5 was not mid-run when its worker died"
        r.start_worker()

        ids = [cut, older, newer]
        await await_for(lambda: r.quiet(ids), timeout_s=60, what="every pair final")
        states = {i: r.states(i)[ORDERED_HANDLER] for i in ids}
        assert states[newer].state == DONE
        # Once the dead run's lock is gone, whichever of v3, v5 (run again) and v7 starts first
        # applies if it is newer than what was applied; the others end stale.
        assert states[older].state in (DONE, STALE)
        assert states[cut].state in (DONE, STALE)
        assert r.effects()[f"{newer}:{ORDERED_HANDLER}"] == 1
        applied = applied_versions(r.redis, "e1")
        assert applied == sorted(applied), applied
        assert applied[-1] == 7, applied
        assert r.runs()[f"{cut}:{ORDERED_HANDLER}"] <= 2
        assert r.runs()[f"{older}:{ORDERED_HANDLER}"] == (states[older].state == DONE)


def known_fast(r: Rig, handler: str) -> None:
    """As if ``handler`` had run fast before: its messages name a batch (one of unknown cost
    starts with one event per message; calhook/store/lua/_lib.lua ``batch_size``)."""
    r.redis.hset(duration_key(handler), "cost", "0.00001")


async def test_a_batch_longer_than_the_lease_runs_each_event_once(tmp_path: Path) -> None:
    # One message names up to CALHOOK_BATCH_MAX events; the batch runs them one after
    # another, longer in all than CALHOOK_LEASE_S, on a worker whose heartbeat is alive.
    long_tasks = {"CALHOOK_TASK_TIME_LIMIT_S": "30", "CALHOOK_VISIBILITY_TIMEOUT_S": "40"}
    async with rig(tmp_path, CALHOOK_BATCH_MAX="6", **long_tasks) as r:
        known_fast(r, "slow")  # it was fast until now: its messages name up to six events
        r.start_worker(queues="dispatch,audit")
        ids = await gather_posts(r, SLOW_TYPE, {"sleep_s": 1.5}, 6)
        await await_for(lambda: r.all_in(ids, "slow", QUEUED), what="the slow pairs queued")
        # One message, or two if the ingress wrote the six in two batches: 9 s or 4.5 s a run.
        assert r.redis.llen(RECORD_QUEUE) <= 2
        r.start_worker()
        r.start_scheduler()

        await await_for(lambda: done_once(r, ids, "slow"), timeout_s=60, what="all 6")
        await await_for(lambda: r.quiet(ids), what="every pair final")
        runs = {i: r.runs()[f"{i}:slow"] for i in ids}
        assert set(runs.values()) == {1}, f"runs per event: {list(runs.values())}"


async def test_a_poison_event_in_a_batch_dead_letters_only_itself(tmp_path: Path) -> None:
    # One event of a handler's message kills its worker every time it runs; the other events of
    # the same message are fine. Only the first is poison: the others never killed anything.
    async with rig(tmp_path, CALHOOK_BATCH_MAX="8") as r:
        known_fast(r, "crash")  # its messages name up to eight events
        r.start_worker(queues="dispatch,audit")
        bad, *good = await asyncio.gather(
            *(r.post(CRASH_TYPE, {"crash": i == 0}, i) for i in range(8))
        )
        await await_for(lambda: r.all_in([bad, *good], "crash", QUEUED), what="crash pairs")
        batch = next(
            kwargs["ids"]
            for raw in r.redis.lrange(RECORD_QUEUE, 0, -1)
            for _, _, kwargs, _ in [read_task_message(raw)]
            if bad in kwargs["ids"]
        )
        behind = batch[batch.index(bad) + 1 :]
        assert behind, f"the poison event came last in its message {batch}: nothing to show"
        r.start_worker()
        r.start_scheduler()

        await await_for(lambda: r.state(bad, "crash") == DEAD_STATE, timeout_s=90, what="poison")
        await await_for(lambda: r.quiet([bad, *good]), timeout_s=60, what="every pair final")
        assert r.redis.hget(f"{DEAD}:{bad}.crash", "reason") == b"poison"
        reasons = {i: r.redis.hget(f"{DEAD}:{i}.crash", "reason") for i in behind}
        ended = Counter(f"{r.state(i, 'crash')} {reasons[i]!r}" for i in behind)
        assert ended == {"done None": len(behind)}, f"behind the poison event: {ended}"
        assert done_once(r, good, "crash")


async def test_a_message_a_killed_worker_had_taken_runs_after_the_task_time_limit(
    tmp_path: Path,
) -> None:
    # kombu hands a dead worker's unacked message back only after the visibility timeout (15
    # minutes by default), and looks for such messages every 100 s. A pair whose message a
    # worker took and then died before starting it is not running, so no lease runs out for it;
    # a live worker starts what it took within the task time limit, so the sweep waits that long.
    async with rig(
        tmp_path, CALHOOK_VISIBILITY_TIMEOUT_S="120", CALHOOK_TASK_TIME_LIMIT_S="5"
    ) as r:
        r.start_worker(queues="dispatch,audit")
        ids = await gather_posts(r, "lead.created", lead(0), 3)
        await await_for(lambda: r.all_in(ids, "record", QUEUED), what="the record messages")
        # What a worker leaves when it is SIGKILLed between taking a message (BRPOP and kombu's
        # unacked bookkeeping, kombu.transport.redis.QoS.append) and starting its pairs.
        raw = r.redis.rpop(RECORD_QUEUE)
        assert isinstance(raw, bytes)
        message = orjson.loads(raw)
        tag = message["properties"]["delivery_tag"]
        r.redis.hset(UNACKED, tag, orjson.dumps([message, "", RECORD_QUEUE]))
        r.redis.zadd(UNACKED_INDEX, {tag: time.time()})
        r.start_worker()
        r.start_scheduler()

        recovery_s = float(r.env["CALHOOK_RECOVERY_S"])
        await await_for(
            lambda: done_once(r, ids, "record"), timeout_s=5 + 5 * recovery_s + 10, what="all 3"
        )
