"""Recovery on real processes: a message lost in transit, a worker killed inside an ordered
handler, a scheduler down past the recovery interval, two operators replaying at once.

Each test has a Redis database of its own and starts its own worker and scheduler (short lease
and recovery interval), so it can stop and kill them; the session's worker never sees its queues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import orjson
import pytest
import redis

from calhook.constants import DISPATCH_TASK, HANDLER_TASK
from calhook.messages import task_message
from calhook.settings import Settings
from calhook.store.connect import pair_store
from calhook.store.keys import DUE
from calhook.store.pairs import PairStore
from tests.support import store
from tests.support.cli import ROOT
from tests.support.core_handlers import APPLIED_KEY, DEFER_TYPE, HOLD_TYPE, RUNS_KEY, STARTED_KEY
from tests.support.recording import EFFECTS_KEY, FIXED_KEY
from tests.support.recording import RUNS_KEY as RECORD_RUNS_KEY
from tests.support.waiting import wait_for
from tests.support.worker import CalhookProcess, SchedulerProcess, WorkerProcess

MODULES = "tests.support.recording,tests.support.core_handlers"
ENV = {"CALHOOK_HANDLER_MODULES": MODULES, "CALHOOK_LEASE_S": "3", "CALHOOK_RECOVERY_S": "1"}


@pytest.fixture
def url(redis_url: str) -> Iterator[str]:
    own = redis_url.rsplit("/", 1)[0] + "/13"
    client = redis.Redis.from_url(own)
    client.flushdb()
    yield own
    client.flushdb()


@pytest.fixture
def db(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


@pytest.fixture
def core(db: redis.Redis, make_settings: Callable[..., Settings]) -> PairStore:
    return pair_store(db, make_settings(recovery_s=1, lease_s=3))


def hold_event(core: PairStore, entity: str, created: str, sleep_s: float = 0) -> str:
    body = {"type": HOLD_TYPE, "created": created, "data": {"entity": entity, "sleep_s": sleep_s}}
    return store.accept(core, orjson.dumps(body), event_type=HOLD_TYPE)


def state(core: PairStore, event_id: str, pair: str) -> str:
    found = core.states(event_id).get(pair)
    return found.state if found else ""


def test_a_message_lost_between_redis_and_a_worker_is_run_once(
    url: str, db: redis.Redis, core: PairStore, tmp_path: Path
) -> None:
    # Given an event routed to `record` whose message vanished in transit
    body = (ROOT.parent / "shared/fixtures/calenso/lead.created.nested.json").read_bytes()
    event_id = store.accept(core, body, event_type="lead.created")
    store.route(core, event_id, [("record", "record")], "lead.created")
    assert db.rpop("record") is not None
    db.delete("dispatch")
    # When a worker and the scheduler run
    with running(url, tmp_path):
        # Then the sweep finds the pair queued with no message anywhere, and queues one
        wait_for(lambda: state(core, event_id, "record") == "done", what="the pair done")
    assert db.hget(RECORD_RUNS_KEY, f"{event_id}:record") == b"1"
    assert db.zcard(DUE) == 0


@pytest.mark.slow
def test_a_worker_killed_inside_an_ordered_handler_delays_its_entity_by_one_lease(
    url: str, db: redis.Redis, core: PairStore, tmp_path: Path
) -> None:
    # Given an ordered handler running a long event of entity e1, with two newer ones behind
    first = hold_event(core, "e1", "2025-05-01 10:00:00", sleep_s=30)
    worker = WorkerProcess(url, tmp_path / "w1.log", 2, **ENV).start()
    scheduler = SchedulerProcess(url, tmp_path / "s.log", **ENV).start()
    try:
        wait_for(lambda: db.lrange(STARTED_KEY, 0, -1) == [first.encode()], what="first runs")
        later = [hold_event(core, "e1", f"2025-05-01 10:0{n}:00") for n in (1, 2)]
        wait_for(lambda: state(core, later[0], "hold.apply") in ("waiting", "queued"))
        # When its worker is killed mid-run (SIGKILL: no shutdown, no ack, no heartbeat)
        worker.signal(signal.SIGKILL)
        worker.process.wait()  # type: ignore[union-attr]
        worker = WorkerProcess(url, tmp_path / "w2.log", 2, **ENV).start()
        # Then everything completes once its lease is over, in order, nothing dead
        wait_for(
            lambda: all(state(core, e, "hold.apply") in ("done", "stale") for e in [first, *later]),
            timeout_s=60,
            what="every event finished",
        )
    finally:
        worker.stop()
        scheduler.stop()
    assert db.zcard("calhook:dead") == 0
    assert [core.states(e)["hold.apply"].attempt for e in later] == [1, 1]
    applied = [e.decode() for e in db.lrange(APPLIED_KEY, 0, -1)]  # type: ignore[union-attr]
    assert applied[-1] == later[-1]
    assert applied == sorted(applied)  # UUIDv7 ids: arrival order is version order here
    assert db.hget(RUNS_KEY, later[0]) in (b"1", None)


def test_a_retry_due_while_the_scheduler_was_down_runs_once(
    url: str, db: redis.Redis, core: PairStore, tmp_path: Path
) -> None:
    # Given a handler failing once, and no scheduler
    body = orjson.dumps({"type": "test.flaky", "created": "2025-05-01 10:00:00",
                         "data": {"fail_times": 1}})  # fmt: skip
    event_id = store.accept(core, body, event_type="test.flaky")
    with running(url, tmp_path, scheduler=False):
        wait_for(lambda: state(core, event_id, "flaky") == "waiting", what="a retry scheduled")
    # When the scheduler comes back long after the retry was due (several recovery intervals),
    # with two workers ready to take copies
    due = core.states(event_id)["flaky"].due_s or 0.0
    wait_for(lambda: time.time() > due + 3, what="three recovery intervals past the due time")
    with running(url, tmp_path, workers=2):
        wait_for(lambda: state(core, event_id, "flaky") == "done", what="the retry done")
    # Then it ran twice in all: the failure and the one retry
    assert db.hget("calhook:test:runs", f"{event_id}:flaky") == b"2"
    assert db.hget(EFFECTS_KEY, f"{event_id}:flaky") == b"1"


def test_two_operators_replaying_every_dead_letter_at_once_run_each_once(
    url: str, db: redis.Redis, core: PairStore, tmp_path: Path
) -> None:
    events = []
    for _ in range(5):
        body = orjson.dumps({"type": "test.permanent", "created": "2025-05-01 10:00:00",
                             "data": {}})  # fmt: skip
        events.append(store.accept(core, body, event_type="test.permanent"))
    with running(url, tmp_path):
        wait_for(lambda: db.zcard("calhook:dead") == 5, what="five dead letters")
        db.set(FIXED_KEY, 1)
        replays = [_cli(url, "dlq", "replay", "--all") for _ in range(2)]
        outputs = [p.communicate(timeout=60)[0] for p in replays]
        wait_for(lambda: all(state(core, e, "permanent") == "done" for e in events))
    replayed = sum(int(line.split()[0]) for out in outputs for line in out.splitlines()
                   if line.endswith(" replayed"))  # fmt: skip
    assert replayed == 5
    for event_id in events:
        assert db.hget("calhook:test:runs", f"{event_id}:permanent") == b"2"
        assert db.hget(EFFECTS_KEY, f"{event_id}:permanent") == b"1"


def _cli(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "calhook", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


class running:
    """A worker (and the scheduler) on ``url`` for the length of a ``with`` block."""

    def __init__(self, url: str, logs: Path, *, scheduler: bool = True, workers: int = 1) -> None:
        self._procs: list[CalhookProcess] = [
            WorkerProcess(url, logs / f"worker-{n}.log", 2, **ENV) for n in range(workers)
        ]
        if scheduler:
            self._procs.append(SchedulerProcess(url, logs / "scheduler.log", **ENV))

    def __enter__(self) -> None:
        for proc in self._procs:
            proc.start()

    def __exit__(self, *_: object) -> None:
        for proc in self._procs:
            proc.stop()


def test_work_queued_by_calhook_0_1_is_taken_over_on_upgrade(
    url: str, db: redis.Redis, core: PairStore, tmp_path: Path
) -> None:
    # Given what calhook 0.1 left in Redis: a dispatch message and a handler message carrying
    # their bodies, a retry in its delayed store with a watchdog copy, a pair its ledger says done
    body = (ROOT.parent / "shared/fixtures/calenso/lead.created.nested.json").read_text()

    def old(task: str, queue: str, event_id: str, **more: object) -> bytes:
        kwargs = {"event_id": event_id, "body": body, "endpoint": "default", "received_at": 1.0}
        return task_message(task, queue=queue, kwargs={**kwargs, **more})

    db.lpush("dispatch", old(DISPATCH_TASK, "dispatch", "old-dispatch"))
    db.lpush("record", old(HANDLER_TASK, "record", "old-handler", handler="record", attempt=1))
    retry = old(HANDLER_TASK, "record", "old-retry", handler="record", attempt=2)
    db.hset("calhook:delayed:messages", "old-retry.record#2", b"record\n" + retry)
    db.zadd("calhook:delayed", {"old-retry.record#2": time.time() * 1000 + 3_600_000})
    db.hset("calhook:watchdog:messages", "old-retry.record", b"record\n" + retry)
    db.zadd("calhook:watchdog", {"old-retry.record": 1})
    db.lpush("record", old(HANDLER_TASK, "record", "old-done", handler="record", attempt=1))
    db.hset("calhook:ledger:old-done", "record", "done")

    # When the new worker and scheduler start
    with running(url, tmp_path):
        # Then each pending piece of work runs once, in the new states
        for event_id in ("old-dispatch", "old-handler", "old-retry"):
            wait_for(partial(lambda e: state(core, e, "record") == "done", event_id), what=event_id)
        wait_for(lambda: db.llen("record") == 0 and db.hlen("unacked") == 0)
    raw: dict[bytes, bytes] = db.hgetall(RECORD_RUNS_KEY)  # type: ignore[assignment]
    runs = {k.decode(): int(v) for k, v in raw.items()}
    assert runs == {"old-dispatch:record": 1, "old-handler:record": 1, "old-retry:record": 1}
    assert not db.exists("calhook:delayed", "calhook:watchdog", "calhook:watchdog:messages")
    assert state(core, "old-handler", "@dispatch") == "done"


def test_waiting_for_a_rate_limit_keeps_the_attempt(
    url: str, db: redis.Redis, core: PairStore, tmp_path: Path
) -> None:
    body = orjson.dumps({"type": DEFER_TYPE, "created": "2025-05-01 10:00:00", "data": {}})
    event_id = store.accept(core, body, event_type=DEFER_TYPE)

    with running(url, tmp_path):
        wait_for(lambda: state(core, event_id, "defer.twice") == "done", what="done")

    assert core.states(event_id)["defer.twice"].attempt == 1
    trail = [orjson.loads(e) for e in db.lrange(f"calhook:trail:{event_id}", 0, -1)]
    outcomes = [e["outcome"] for e in trail if e.get("handler") == "defer.twice"]
    assert outcomes == ["deferred", "deferred", "ok"]
    assert db.zcard("calhook:dead") == 0
