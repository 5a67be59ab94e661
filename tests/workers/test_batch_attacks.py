"""Attacks on the batch core (issue 12): each test is a way to lose, repeat, reorder or
mis-count work through batches, driven step by step on the real scripts, runner and dispatcher
against the real Redis (tests/support/core_rig.py), and states the behaviour that must hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from base64 import b64encode
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.messages import read_task_message
from calhook.settings import Settings
from calhook.store.keys import DUE, STATS_OUTCOMES, UNACKED, UNACKED_INDEX, duration_key
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
    known_fast,
    messages,
    process,
    state,
    worker_of,
)
from workers.errors import PermanentError
from workers.ordering import UPDATE, Version
from workers.registry import Handler, HandlerContext
from workers.scheduler import sweep_once

QUEUE = "attack"


class Killed(BaseException):
    """The worker process dies here: no finish, no ack (the test stops using that Worker)."""


def entity_version(event: UnknownEvent, event_id: str) -> Version:
    """Every attack event updates one entity, in the order of its `created`."""
    return Version("thing:1", int(event.created.timestamp()), UPDATE, event_id)


def created_s(second: int) -> int:
    return int(dt.datetime(2025, 5, 1, 10, 0, second, tzinfo=dt.UTC).timestamp())


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


# --- dispatch batches -------------------------------------------------------------------------


def test_a_dispatch_batch_with_a_killer_routes_every_other_event_once_and_poisons_the_killer(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Three ingress batches of three events; one dispatch task takes them all, and routing the
    fifth kills its worker, every time. Every run after the first finds the nine (then the
    rest) started before: suspects, each dispatched alone. The killer ends dead as poison after
    CALHOOK_MAX_DELIVERIES starts; every other event is routed exactly once (one handler
    message names it) and handled once."""
    handled: Counter[str] = Counter()
    handler = attack_handler("a.apply", lambda event, ctx: handled.update([ctx.event_id]))
    registry = attack_registry(handler)
    scheduler = process(db, batch_settings, timeline)
    killer: list[str] = []
    workers: list[Worker] = []

    def new_worker() -> Worker:
        worker = Worker(db, process(db, batch_settings, timeline), registry, batch_settings)
        route = worker.dispatcher._route

        def routing(s: Any, *parsed: Any) -> Any:
            if s.event_id == killer[0]:
                raise Killed
            return route(s, *parsed)

        worker.dispatcher._route = routing  # type: ignore[method-assign,assignment]
        workers.append(worker)
        return worker

    try:
        known_fast(db, "a.apply")
        ids: list[str] = []
        for _ in range(3):
            ids += accept_batch(scheduler, [attack_body() for _ in range(3)])
        killer.append(ids[4])
        for _ in range(30):
            if not db.llen(DISPATCH_QUEUE):
                timeline.t += LEASE_S + RECOVER_S + 1
                if not sweep_once(scheduler, batch_settings):
                    break
                continue
            with contextlib.suppress(Killed):
                new_worker().take(DISPATCH_QUEUE)
        innocent = [e for e in ids if e != killer[0]]
        assert sorted(e for m in messages(db, QUEUE) for e in m["ids"]) == sorted(innocent)
        run_all(new_worker())
    finally:
        for w in workers:
            w.stop()

    record = RecordStore(db, DEAD_KIND).get(f"{killer[0]}.@dispatch", with_body=False) or {}
    assert record.get("reason") == "poison"
    assert scheduler.states(killer[0])["@dispatch"].starts == batch_settings.max_deliveries
    assert handled == Counter(innocent)
    assert audit(db) == []


LOCK = "calhook:order:a.apply:thing:1:lock"


def ordered_run(
    db: redis.Redis,
    settings: Settings,
    timeline: Timeline,
    apply: Callable[[UnknownEvent, HandlerContext], None],
    seconds: list[int],
    before: Callable[[Worker, list[str]], None] = lambda worker, ids: None,
) -> list[str]:
    """Updates of one entity (created at ``seconds``) accepted in one batch, so one handler
    message; ``before`` runs once they are queued; then the worker runs the queue, and the
    scheduler and the worker go on until nothing is left. The event ids, in version order."""
    handler = attack_handler("a.apply", apply, order_key=entity_version, ordered=True)
    scheduler = process(db, settings, timeline)
    with worker_of(db, settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        ids = accept_batch(worker.pairs, [versioned(s) for s in seconds])
        worker.take(DISPATCH_QUEUE)
        before(worker, ids)
        run_all(worker)
        for _ in range(10):
            age(db, timeline, max(settings.order_wait_s, LEASE_S / 10) + 1)
            sweep_once(scheduler, settings)
            run_all(worker)
    return [ids[seconds.index(s)] for s in sorted(seconds)]


def test_three_versions_whose_oldest_finds_its_entity_busy_all_wait_then_apply_in_order(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Three updates of one entity in one message, newest first; another worker holds the
    entity (a live lock). The oldest waits, the two others wait behind it; once the other
    worker lets go, all three apply, oldest first, each once."""
    applied: list[str] = []

    def busy(worker: Worker, ids: list[str]) -> None:
        db.set(LOCK, "elsewhere/a.apply|other", px=3_600_000)

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        applied.append(ctx.event_id)

    ids = ordered_run(db, batch_settings, timeline, apply, [3, 1, 2], busy)
    assert applied == []  # the lock is held all along: nothing ran
    db.delete(LOCK)
    scheduler = process(db, batch_settings, timeline)
    with worker_of(
        db,
        batch_settings,
        timeline,
        attack_handler("a.apply", apply, order_key=entity_version, ordered=True),
    ) as worker:
        for _ in range(5):
            age(db, timeline, batch_settings.order_wait_s + 1)
            sweep_once(scheduler, batch_settings)
            run_all(worker)
    assert applied == ids
    assert audit(db) == []


@pytest.mark.parametrize("how", ["stale", "dead", "retried"])
def test_three_versions_whose_oldest_ends_without_applying_let_the_others_apply_in_order(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline, how: str
) -> None:
    """The oldest of three updates of one entity in one message is stale (a newer version
    was applied before), or ends dead (a permanent error), or fails (its retry waits): the two
    others apply in version order, each once; a retried oldest is stale when its turn
    comes (a newer version was applied). Every pair ends final, the counters right."""
    applied: list[str] = []
    oldest: list[str] = []

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        if ctx.event_id == oldest[0] and how == "dead":
            raise PermanentError("refused")
        if ctx.event_id == oldest[0] and how == "retried":
            raise RuntimeError("try again")
        applied.append(ctx.event_id)

    def setup(worker: Worker, ids: list[str]) -> None:
        oldest.append(ids[1])
        if how == "stale":
            db.hset(
                "calhook:order:a.apply:thing:1",
                mapping={"created_s": created_s(1), "kind": UPDATE, "event_id": "~"},
            )

    ids = ordered_run(db, batch_settings, timeline, apply, [3, 1, 2], setup)
    assert applied == ids[1:]
    final = {"stale": "stale", "dead": "dead", "retried": "stale"}[how]
    scheduler = process(db, batch_settings, timeline)
    assert [state(scheduler, e, "a.apply") for e in ids] == [final, "done", "done"]
    assert audit(db) == []


def test_a_batch_out_of_time_with_later_events_left_hands_them_back_and_frees_the_entity(
    db: redis.Redis, make_settings: Callable[..., Settings], timeline: Timeline
) -> None:
    """A one-second task time limit leaves a batch about half a second; the oldest of three
    updates of one entity takes longer. The two `later` ones are handed back (no attempt
    spent), the entity's lock is free, and they apply after it, in order, once each."""
    settings = make_settings(
        lease_s=LEASE_S, recovery_s=RECOVER_S, batch_max=64, task_time_limit_s=1
    )
    applied: list[str] = []
    slow: list[str] = []

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        if not slow:
            slow.append(ctx.event_id)
            time.sleep(0.6)
        applied.append(ctx.event_id)

    def check(worker: Worker, ids: list[str]) -> None:
        outcomes = worker.take(QUEUE)
        assert sorted(outcomes.values()) == ["deferred", "deferred", "ok"]
        assert not db.exists(LOCK)
        for e in ids:
            if outcomes[e] == "deferred":
                pair = worker.pairs.states(e)["a.apply"]
                assert (pair.state, pair.attempt, pair.starts) == ("waiting", 1, 0)

    ids = ordered_run(db, settings, timeline, apply, [3, 1, 2], check)
    assert applied == ids
    assert audit(db) == []


def test_a_soft_time_limit_between_two_events_hands_back_the_rest_of_the_batch(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Celery's soft time limit strikes while a sync batch records the endings it has (between
    two events, not inside a handler). What ran is recorded; what has not run is handed back
    at once (waiting, no attempt spent, no start counted), as when the limit strikes inside a
    handler, rather than left started under leases nobody renews (run again only after the
    lease, each as a suspect with one more start counted)."""
    from celery.exceptions import SoftTimeLimitExceeded

    runs: Counter[str] = Counter()

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        runs[ctx.event_id] += 1
        time.sleep(0.01)  # longer than the 5 ms window: the batch records between events

    scheduler = process(db, batch_settings, timeline)
    with worker_of(db, batch_settings, timeline, attack_handler("a.apply", apply)) as worker:
        known_fast(db, "a.apply")
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(4)])
        worker.take(DISPATCH_QUEUE)
        finish = worker.pairs.finish
        struck: list[bool] = []

        def finish_struck(*args: Any, **kw: Any) -> list[str]:
            if not struck:
                struck.append(True)
                raise SoftTimeLimitExceeded
            return finish(*args, **kw)

        worker.pairs.finish = finish_struck  # type: ignore[method-assign]
        with contextlib.suppress(SoftTimeLimitExceeded):
            worker.take(QUEUE)

    ran = [e for e in ids if runs[e]]
    rest = [e for e in ids if not runs[e]]
    assert ran
    assert rest
    assert {state(scheduler, e, "a.apply") for e in ran} == {"done"}
    for e in rest:
        pair = scheduler.states(e)["a.apply"]
        assert (pair.state, pair.attempt, pair.starts) == ("waiting", 1, 0)
    assert audit(db) == []


# --- what a take must leave on the queue ------------------------------------------------------


def foreign_message(kwargs: dict[str, Any], *, base64_body: bool, task: str) -> bytes:
    """A message calhook's scripts did not push: kombu's (base64 body), or calhook 0.1's."""
    body = orjson.dumps([[], kwargs, {"callbacks": None}])
    return orjson.dumps(
        {
            "body": (b64encode(body) if base64_body else body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": task, "id": "legacy-1"},
            "properties": {
                "body_encoding": "base64" if base64_body else "utf-8",
                "delivery_tag": "legacy-1",
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
            },
        }
    )


@pytest.mark.parametrize("base64_body", [True, False])
def test_a_take_stops_at_a_legacy_message_behind_it_and_leaves_it_for_its_own_task(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline, base64_body: bool
) -> None:
    """Behind two messages of a handler waits a message of calhook 0.1 for the same handler
    (kombu's base64 body, or a plain one carrying the event instead of ids). The batch takes
    the second message and stops there: the legacy message stays, whole, for the task that
    takes it over; the batch's events run once each."""
    from calhook.constants import HANDLER_TASK

    runs: Counter[str] = Counter()
    handler = attack_handler("a.apply", lambda event, ctx: runs.update([ctx.event_id]))
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        ids: list[str] = []
        for _ in range(2):
            ids += accept_batch(worker.pairs, [attack_body()])
            worker.take(DISPATCH_QUEUE)
        legacy = {"handler": "a.apply", "event_id": "old-1", "body": "{}", "received_at": 1.0}
        raw = foreign_message(legacy, base64_body=base64_body, task=HANDLER_TASK)
        db.lpush(QUEUE, raw)  # the newest: taken after the two
        assert worker.take(QUEUE) == {ids[0]: "ok", ids[1]: "ok"}

    assert db.lrange(QUEUE, 0, -1) == [raw]
    assert runs == Counter(ids)
    assert audit(db) == []


@pytest.mark.parametrize("behind", ["another handler", "the same handler"])
def test_a_dispatch_does_not_run_inline_a_message_with_an_older_one_waiting_before_it(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline, behind: str
) -> None:
    """A dispatching worker that consumes the handler queue runs a handler's new message itself
    only when nothing waits before it. With an older message at the tail (another handler's,
    or an older update of the same entity for the same handler) the new one waits its turn:
    then each event runs once, the same entity's versions in order."""
    applied: list[tuple[str, str]] = []

    def record(name: str) -> Callable[[UnknownEvent, HandlerContext], None]:
        return lambda event, ctx: applied.append((name, ctx.event_id))

    one = attack_handler("a.apply", record("one"), order_key=entity_version, ordered=True)
    two = Handler("a.two", frozenset({"test.other"}), QUEUE, record("two"))
    with worker_of(db, batch_settings, timeline, one, two) as worker:
        known_fast(db, "a.apply", "a.two")
        if behind == "another handler":
            other = {"type": "test.other", "created": "2025-05-01 10:00:00", "data": {}}
            older = accept_batch(worker.pairs, [orjson.dumps(other)], event_type="test.other")
        else:
            older = accept_batch(worker.pairs, [versioned(1)])
        worker.take(DISPATCH_QUEUE)
        assert db.llen(QUEUE) == 1
        newer = accept_batch(worker.pairs, [versioned(2)])
        worker.take(DISPATCH_QUEUE, run_here=[QUEUE])
        assert applied == []
        run_all(worker)

    first = "two" if behind == "another handler" else "one"
    assert applied == [(first, older[0]), ("one", newer[0])]
    assert audit(db) == []


def test_two_async_batches_of_one_handler_share_its_concurrency_cap(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Two tasks of the process (two threads) run a batch of the same async handler each: at
    most its `concurrency` events run at once in the process, every event once."""
    in_flight = 0
    most = 0
    done: Counter[str] = Counter()

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.03)
        in_flight -= 1
        done[ctx.event_id] += 1

    handler = attack_handler("a.call", call, concurrency=3)
    with worker_of(db, batch_settings, timeline, handler) as worker:
        ids: list[str] = []
        for _ in range(2):
            ids += accept_batch(worker.pairs, [attack_body() for _ in range(6)])
            worker.take(DISPATCH_QUEUE)
        taken = [read_task_message(raw)[2] for raw in db.lrange(QUEUE, 0, -1)]
        db.delete(QUEUE)
        results: list[dict[str, str]] = []
        threads = [
            threading.Thread(
                target=lambda k=k: results.append(
                    worker.runner.run("a.call", k["ids"], k["seq"], QUEUE)
                )
            )
            for k in taken
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

    assert most == 3
    assert done == Counter(ids)
    assert sorted(len(r) for r in results) == [6, 6]
    assert audit(db) == []


def test_an_async_batch_whose_recording_reply_is_lost_records_each_ending_once(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """The group commit's call runs in Redis but its reply is lost (a dropped connection): the
    Recorder calls again. Nothing is recorded twice (a second done is late), every pair is
    done, the counters right, and the task still ends."""
    runs: Counter[str] = Counter()

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        runs[ctx.event_id] += 1
        await asyncio.sleep(0)

    scheduler = process(db, batch_settings, timeline)
    with worker_of(db, batch_settings, timeline, attack_handler("a.call", call)) as worker:
        make = worker.runner._make_recorder
        lost: list[bool] = []

        def recorder() -> Any:
            made = make()
            finish_many = made._store.finish_many

            async def reply_lost(*args: Any) -> list[str]:
                got = await finish_many(*args)
                if not lost:
                    lost.append(True)
                    raise redis.ConnectionError("connection reset")
                return got

            made._store.finish_many = reply_lost  # type: ignore[method-assign,assignment]
            return made

        worker.runner._make_recorder = recorder
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(5)])
        worker.take(DISPATCH_QUEUE)
        outcomes = worker.take(QUEUE)

    assert lost == [True]
    assert outcomes == dict.fromkeys(ids, "ok")
    assert runs == Counter(ids)
    assert {state(scheduler, e, "a.call") for e in ids} == {"done"}
    assert int(db.hget(STATS_OUTCOMES, "a.call\tok") or 0) == len(ids)
    assert audit(db) == []


# --- how many events a message names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cost", "sizes"), [("0", [5]), ("0.000000", [5]), ("1e9", [1] * 5), ("5", [1] * 5)]
)
def test_a_handlers_cost_of_zero_fills_its_messages_and_a_huge_one_names_one_event_each(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline, cost: str, sizes: list[int]
) -> None:
    handler = attack_handler("a.apply", lambda event, ctx: None)
    db.hset(duration_key("a.apply"), "cost", cost)
    with worker_of(db, batch_settings, timeline, handler) as worker:
        accept_batch(worker.pairs, [attack_body() for _ in range(5)])
        worker.take(DISPATCH_QUEUE)
        assert [len(m["ids"]) for m in messages(db, QUEUE)] == sizes
        assert len(run_all(worker)) == 5
    assert audit(db) == []


def test_a_handler_turned_slow_takes_no_more_messages_than_its_first_and_loses_none(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Messages of eight events were queued while the handler was fast; it turns slow (its
    cost says one event per message now). A task runs the message it took and takes no other
    (eight more would not fit); the next tasks take the rest; every event runs once."""
    runs: Counter[str] = Counter()
    handler = attack_handler("a.apply", lambda event, ctx: runs.update([ctx.event_id]))
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        ids: list[str] = []
        for _ in range(3):
            ids += accept_batch(worker.pairs, [attack_body() for _ in range(8)])
            worker.take(DISPATCH_QUEUE)
        assert [len(m["ids"]) for m in messages(db, QUEUE)] == [8, 8, 8]
        db.hset(duration_key("a.apply"), "cost", "5")
        assert len(worker.take(QUEUE)) == 8
        assert db.llen(QUEUE) == 2
        run_all(worker)
    assert runs == Counter(ids)
    assert audit(db) == []


def test_a_sweep_recovering_many_expired_runs_queues_each_once_in_full_messages(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """A worker running 150 events of an async handler dies; after the lease one sweep queues
    them, 64 to a message (an async handler's messages are full), each once; they run once
    more each (each a suspect, alone)."""
    runs: Counter[str] = Counter()
    killer: list[str] = []

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        runs[ctx.event_id] += 1
        if not killer:
            killer.append(ctx.event_id)
            raise Killed

    scheduler = process(db, batch_settings, timeline)
    handler = attack_handler("a.call", call)
    with worker_of(db, batch_settings, timeline, handler) as worker:
        ids: list[str] = []
        for _ in range(3):
            ids += accept_batch(worker.pairs, [attack_body() for _ in range(50)])
        run_all(worker, DISPATCH_QUEUE)
        assert db.llen(QUEUE) == 3
        for _ in range(3):
            with contextlib.suppress(Killed):
                worker.take(QUEUE)
    dead_run = {e for e in ids if state(scheduler, e, "a.call") == "running"}
    timeline.t += LEASE_S + 1
    assert sweep_once(scheduler, batch_settings) == len(dead_run)
    sizes = sorted(len(m["ids"]) for m in messages(db, QUEUE))
    assert sum(sizes) == len(dead_run)
    assert max(sizes) <= 64
    assert sorted(e for m in messages(db, QUEUE) for e in m["ids"]) == sorted(dead_run)
    with worker_of(db, batch_settings, timeline, handler) as second:
        run_all(second)
    assert {state(scheduler, e, "a.call") for e in ids} == {"done"}
    assert all(runs[e] == (2 if e in dead_run else 1) for e in ids)
    assert audit(db) == []
