"""Attacks on the batch core (issue 12): each test is a way to lose, repeat, reorder or
mis-count work through batches, driven step by step on the real scripts, runner and dispatcher
against the real Redis (tests/support/core_rig.py), and states the behaviour that must hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.messages import read_task_message
from calhook.settings import Settings
from calhook.store.keys import DUE, UNACKED, UNACKED_INDEX, due_member, duration_key
from calhook.store.pairs import PairStore
from calhook.store.records import DEAD as DEAD_KIND
from calhook.store.records import RecordStore
from schemas import UnknownEvent
from tests.support.core_rig import (
    ATTACK_TYPE,
    LEASE_S,
    RECOVER_S,
    Timeline,
    Worker,
    accept_batch,
    attack_body,
    attack_handler,
    attack_registry,
    audit,
    copies,
    messages,
    process,
    state,
)
from workers.ordering import UPDATE, Version
from workers.registry import HandlerContext
from workers.scheduler import sweep_once

QUEUE = "attack"


class Killed(BaseException):
    """The worker process dies here: no finish, no ack (the test stops using that Worker)."""


@pytest.fixture
def batch_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S, batch_max=64)


@pytest.fixture
def timeline() -> Timeline:
    return Timeline()


@contextlib.contextmanager
def worker_of(
    db: redis.Redis, settings: Settings, timeline: Timeline, *handlers: Any
) -> Iterator[Worker]:
    worker = Worker(db, process(db, settings, timeline), attack_registry(*handlers), settings)
    try:
        yield worker
    finally:
        worker.stop()


def known_fast(db: redis.Redis, *handlers: str) -> None:
    """As if ``handlers`` had run before, fast: their messages name up to the batch size."""
    for name in handlers:
        db.hset(duration_key(name), "cost", "0.00001")


def entity_version(event: UnknownEvent, event_id: str) -> Version:
    """Every attack event updates one entity, in the order of its `created`."""
    return Version("thing:1", int(event.created.timestamp()), UPDATE, event_id)


def versioned(second: int) -> bytes:
    return orjson.dumps(
        {"type": ATTACK_TYPE, "created": f"2025-05-01 10:00:{second:02d}", "data": {"v": second}}
    )


def take_held(db: redis.Redis, queue: str, timeline: Timeline) -> tuple[bytes, dict[str, Any]]:
    """What kombu does when a worker takes a message: BRPOP it into ``unacked`` (and its index,
    by the time taken). The raw message and its kwargs."""
    raw = db.rpop(queue)
    assert isinstance(raw, bytes), f"no message on {queue}"
    tag = orjson.loads(raw)["properties"]["delivery_tag"]
    db.hset(UNACKED, tag, orjson.dumps([raw.decode(), "", queue]))
    db.zadd(UNACKED_INDEX, {tag: timeline.t})
    return raw, read_task_message(raw)[2]


def ack(db: redis.Redis, raw: bytes) -> None:
    tag = orjson.loads(raw)["properties"]["delivery_tag"]
    db.hdel(UNACKED, tag)
    db.zrem(UNACKED_INDEX, tag)


def age(db: redis.Redis, timeline: Timeline, s: float) -> None:
    """``s`` seconds pass: the timeline moves on, and every key's TTL runs down with it (as in
    test_core_attacks.py: an entity's lock is a PX lease)."""
    timeline.t += s
    keys = list(db.scan_iter(count=1000))
    ttls = [db.pttl(key) for key in keys]
    for key, ttl in zip(keys, ttls, strict=True):
        if ttl > s * 1000:
            db.pexpire(key, ttl - int(s * 1000))
        elif ttl >= 0:
            db.delete(key)


def run_all(worker: Worker, queue: str = QUEUE) -> dict[str, str]:
    """Take every message of ``queue`` with ``worker``; every event's last outcome."""
    outcomes: dict[str, str] = {}
    while worker.db.llen(queue):
        outcomes.update(worker.take(queue))
    return outcomes


# --- messages a batch popped: their pairs stay the batch's -----------------------------------


def test_events_a_batch_popped_and_holds_for_later_get_no_copy_from_the_sweep(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """A backlog older than the recovery interval: updates of one entity, one message each.
    A worker takes the first message (kombu holds it unacked) and its start pops the others;
    their events are `later` (they start once the oldest has finished), still queued, while
    the oldest runs. The scheduler sweeps meanwhile. The worker is alive and holds them: the
    sweep must see them pending, as it sees the held message's own events, and queue no copy
    (it took them for lost: their messages are gone and calhook:taken is past them)."""
    applied: list[str] = []
    scheduler = process(db, batch_settings, timeline)

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        applied.append(ctx.event_id)
        if len(applied) == 1:
            timeline.t += 5
            sweep_once(scheduler, batch_settings)

    handler = attack_handler("a.apply", apply, order_key=entity_version, ordered=True)
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        ids: list[str] = []
        for second in range(1, 5):
            ids += accept_batch(worker.pairs, [versioned(second)])
            worker.take(DISPATCH_QUEUE)
        assert [m["ids"] for m in reversed(messages(db, QUEUE))] == [[e] for e in ids]
        timeline.t += RECOVER_S + 10  # the backlog waited

        raw, kwargs = take_held(db, QUEUE, timeline)
        outcomes = worker.runner.run("a.apply", kwargs["ids"], kwargs["seq"], QUEUE)
        ack(db, raw)

    assert applied == ids
    assert outcomes == dict.fromkeys(ids, "ok")
    assert db.llen(QUEUE) == 0, [m["ids"] for m in messages(db, QUEUE)]
    assert audit(db) == []


def test_a_worker_killed_after_its_start_popped_more_messages_loses_and_repeats_nothing(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Three messages of four events; the worker takes the first, its start pops the other two
    and starts all twelve, and the first event kills it before anything ran. After the lease
    the sweep queues the twelve once; each is then a suspect (started before, unfinished) and
    runs alone: the killer twice (its first run died), every other event once, and only the
    killer's starts count towards poison."""
    runs: Counter[str] = Counter()
    killer: list[str] = []

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        runs[ctx.event_id] += 1
        if ctx.event_id == killer[0] and runs[ctx.event_id] == 1:
            raise Killed

    handler = attack_handler("a.apply", apply)
    scheduler = process(db, batch_settings, timeline)
    with worker_of(db, batch_settings, timeline, handler) as first:
        known_fast(db, "a.apply")
        ids: list[str] = []
        for _ in range(3):
            ids += accept_batch(first.pairs, [attack_body() for _ in range(4)])
            first.take(DISPATCH_QUEUE)
        killer.append(ids[0])
        with pytest.raises(Killed):
            first.take(QUEUE)
    assert db.llen(QUEUE) == 0
    assert {state(scheduler, e, "a.apply") for e in ids} == {"running"}

    timeline.t += LEASE_S + 1
    sweep_once(scheduler, batch_settings)
    assert sum(copies(db, QUEUE, e) for e in ids) == len(ids)
    with worker_of(db, batch_settings, timeline, handler) as second:
        outcomes = run_all(second)
    timeline.t += LEASE_S + RECOVER_S + 1
    assert sweep_once(scheduler, batch_settings) == 0

    assert outcomes == dict.fromkeys(ids, "ok")
    assert runs == Counter({**dict.fromkeys(ids, 1), killer[0]: 2})
    starts = {e: scheduler.states(e)["a.apply"].attempt for e in ids}
    assert starts == dict.fromkeys(ids, 1)
    assert audit(db) == []
    assert db.zcard(DUE) == 0


# --- async batches --------------------------------------------------------------------------


def test_an_async_handler_raising_cancelled_error_fails_that_event_alone(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """A library inside an async handler raises CancelledError on its own (nobody cancelled
    the batch). That event failed like any other (its retry scheduled); its neighbours run and
    are recorded, and the task waits for them, their leases renewed, rather than fail at once
    and leave them running on the loop unrenewed (run again by the sweep after the lease)."""
    bad: list[str] = []
    done: list[str] = []

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        if ctx.event_id in bad:
            raise asyncio.CancelledError
        await asyncio.sleep(0.2)
        done.append(ctx.event_id)

    scheduler = process(db, batch_settings, timeline)
    with worker_of(db, batch_settings, timeline, attack_handler("a.call", call)) as worker:
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(3)])
        bad.append(ids[0])
        worker.take(DISPATCH_QUEUE)
        outcomes = worker.take(QUEUE)

    assert outcomes == {**dict.fromkeys(ids, "ok"), ids[0]: "retry_scheduled"}
    assert sorted(done) == sorted(ids[1:])
    assert [state(scheduler, e, "a.call") for e in ids] == ["waiting", "done", "done"]
    assert audit(db) == []


def test_an_async_batch_torn_down_by_one_event_waits_for_the_others_first(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """One event of an async batch raises a BaseException the runner does not handle (the
    task is torn down with it). The other events are already running on the process's loop:
    the task must not end (and stop renewing their leases) before they have ended and their
    endings are recorded."""

    class Boom(BaseException):
        """Not an Exception: it tears the task down."""

    bad: list[str] = []

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        if ctx.event_id in bad:
            raise Boom
        await asyncio.sleep(0.2)

    scheduler = process(db, batch_settings, timeline)
    with worker_of(db, batch_settings, timeline, attack_handler("a.call", call)) as worker:
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(3)])
        bad.append(ids[0])
        worker.take(DISPATCH_QUEUE)
        with pytest.raises(Boom):
            worker.take(QUEUE)
        # as the task ends: the others are recorded, the one torn down waits for its lease
        assert [state(scheduler, e, "a.call") for e in ids] == ["running", "done", "done"]
        assert worker.heartbeat._held == set()

    timeline.t += LEASE_S + 1
    sweep_once(scheduler, batch_settings)
    assert [copies(db, QUEUE, e) for e in ids] == [1, 0, 0]
    assert audit(db) == []


# --- order inside a batch -------------------------------------------------------------------


def test_a_later_event_does_not_overtake_the_older_suspect_of_its_entity(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Two updates of one entity in one message. The older one kills its worker; the
    scheduler is down, so nobody keeps the entity for the cut run, and its lock runs out. kombu
    hands the message back (visibility timeout): the older event is now a suspect (it starts
    alone, at the end of the task) and the newer one would be `later`. The newer one must not
    be applied before the older one has run again: it waits behind it, as it waits behind an
    older event whose entity is busy, rather than start as soon as the suspect is set aside
    (and then the older one is skipped as stale)."""
    applied: list[str] = []
    tries: Counter[str] = Counter()
    order: list[str] = []

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        tries[ctx.event_id] += 1
        if ctx.event_id == order[0] and tries[ctx.event_id] == 1:
            raise Killed
        applied.append(ctx.event_id)

    handler = attack_handler("a.apply", apply, order_key=entity_version, ordered=True)
    scheduler = process(db, batch_settings, timeline)
    with worker_of(db, batch_settings, timeline, handler) as first:
        known_fast(db, "a.apply")
        order += accept_batch(first.pairs, [versioned(1), versioned(2)])
        first.take(DISPATCH_QUEUE)
        [raw] = db.lrange(QUEUE, 0, -1)
        with pytest.raises(Killed):
            first.take(QUEUE)

    age(db, timeline, LEASE_S + RECOVER_S + 1)
    db.rpush(QUEUE, raw)  # kombu's restore_visible: back at the tail
    with worker_of(db, batch_settings, timeline, handler) as second:
        run_all(second)
        for _ in range(3):
            timeline.t += batch_settings.order_wait_s + 1
            sweep_once(scheduler, batch_settings)
            run_all(second)

    assert applied == order
    assert [state(scheduler, e, "a.apply") for e in order] == ["done", "done"]
    assert audit(db) == []
