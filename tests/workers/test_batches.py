"""Batches (issue 12): one task runs many events, and each (event, handler) stays its own.

Driven step by step on the real scripts, runner and dispatcher (tests/support/core_rig.py):
what a task takes from its queue, how many round trips its bookkeeping costs, that one event
failing, being killed or running late never re-runs or holds back the others, that events of one
entity apply in version order, that async handlers run a batch concurrently under their cap, and
that a dispatching worker runs a handler's new message itself only when nothing waits before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.settings import Settings
from calhook.store.keys import due_member, duration_key
from calhook.store.pairs import PairStore
from calhook.store.scripts import Scripts
from schemas import UnknownEvent
from tests.support.core_rig import (
    ATTACK_TYPE,
    LEASE_S,
    RECOVER_S,
    Timeline,
    accept_batch,
    attack_body,
    attack_handler,
    audit,
    known_fast,
    messages,
    process,
    state,
    worker_of,
)
from workers.ordering import UPDATE, Version
from workers.registry import HandlerContext
from workers.scheduler import sweep_once

QUEUE = "attack"


class CountingScripts(Scripts):
    """The real scripts, counting the calls of each (the round trips a task costs)."""

    calls: Counter[str]

    def call(
        self, name: str, args: list[Any], keys: list[str] | None = None, now_s: Any = None
    ) -> Any:
        self.calls[name] += 1
        return super().call(name, args, keys, now_s)


def backlog(core: PairStore, batches: int, per_batch: int, **data: Any) -> list[str]:
    """``batches`` ingress batches of ``per_batch`` events: one dispatch message each."""
    ids: list[str] = []
    for _ in range(batches):
        ids += accept_batch(core, [attack_body(**data) for _ in range(per_batch)])
    return ids


def test_a_backlog_is_dispatched_and_handled_in_one_task_each_with_one_start_apiece(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    runs: Counter[str] = Counter()
    handler = attack_handler("a.count", lambda event, ctx: runs.update([ctx.event_id]))
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.count")
        ids = backlog(worker.pairs, batches=10, per_batch=4)
        assert db.llen(DISPATCH_QUEUE) == 10
        counting = CountingScripts(db, worker.pairs.scripts.clock)
        counting.calls = Counter()
        worker.pairs.scripts = counting

        # One dispatch task takes the ten messages waiting: one start, one fan-out
        assert set(worker.take(DISPATCH_QUEUE)) == set(ids)
        assert db.llen(DISPATCH_QUEUE) == 0
        assert counting.calls == {"start": 1, "fan_out": 1}
        # and queues one handler message naming all forty events.
        assert [sorted(m["ids"]) for m in messages(db, QUEUE)] == [sorted(ids)]

        counting.calls.clear()
        outcomes = worker.take(QUEUE)

    assert outcomes == dict.fromkeys(ids, "ok")
    assert runs == Counter(ids)
    # One start for the forty; their endings share round trips (recorded every few ms).
    assert counting.calls["start"] == 1
    assert 1 <= counting.calls["finish"] <= 10
    assert all(state(worker.pairs, e, "a.count") == "done" for e in ids)
    assert audit(db) == []


def test_a_task_takes_only_the_messages_of_its_own_handler_and_at_most_the_batch_size(
    db: redis.Redis, make_settings: Callable[..., Settings], timeline: Timeline
) -> None:
    settings = make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S, batch_max=8)
    done: list[str] = []
    first = attack_handler("a.first", lambda event, ctx: done.append(ctx.event_id))
    with worker_of(db, settings, timeline, first) as worker:
        known_fast(db, "a.first")
        # Four events per message, one handler message per dispatch message.
        for _ in range(3):
            accept_batch(worker.pairs, [attack_body() for _ in range(4)])
            worker.take(DISPATCH_QUEUE)
        assert [len(m["ids"]) for m in messages(db, QUEUE)] == [4, 4, 4]
        outcomes = worker.take(QUEUE)

    # The message taken and the next one fit in eight; the third waits for the next task.
    assert len(outcomes) == 8
    assert [len(m["ids"]) for m in messages(db, QUEUE)] == [4]


def test_a_message_of_another_handler_stops_the_take(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    applied: list[str] = []

    def record(name: str) -> Callable[[Any, HandlerContext], None]:
        return lambda event, ctx: applied.append(name)

    handlers = (attack_handler("a.one", record("one")), attack_handler("a.two", record("two")))
    with worker_of(db, batch_settings, timeline, *handlers) as worker:
        known_fast(db, "a.one", "a.two")
        for _ in range(2):
            accept_batch(worker.pairs, [attack_body()])
            worker.take(DISPATCH_QUEUE)
        # Oldest first: one, two, one, two.
        assert [m["handler"] for m in reversed(messages(db, QUEUE))] == [
            "a.one",
            "a.two",
            "a.one",
            "a.two",
        ]
        worker.take(QUEUE)

    assert applied == ["one"]
    assert [m["handler"] for m in reversed(messages(db, QUEUE))] == ["a.two", "a.one", "a.two"]


def test_one_event_failing_in_a_batch_neither_reruns_nor_holds_back_the_others(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    runs: Counter[str] = Counter()
    bad: list[str] = []

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        runs[ctx.event_id] += 1
        if ctx.event_id in bad:
            raise RuntimeError("the destination refused this one")

    with worker_of(db, batch_settings, timeline, attack_handler("a.apply", apply)) as worker:
        known_fast(db, "a.apply")
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(6)])
        bad.append(ids[2])
        worker.take(DISPATCH_QUEUE)
        outcomes = worker.take(QUEUE)

    assert outcomes[ids[2]] == "retry_scheduled"
    assert [outcomes[e] for e in ids if e != ids[2]] == ["ok"] * 5
    assert runs == Counter(ids)
    states = worker.pairs.states(ids[2])["a.apply"]
    assert (states.state, states.attempt) == ("waiting", 2)
    assert audit(db) == []


def test_a_worker_killed_mid_batch_runs_again_only_what_had_not_finished(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """The third of six events kills its worker (the first time). The two before it were
    recorded as done; the four from the killer on were started and hold leases that run out,
    and run again each on its own (any of them might be the killer) — the killer twice."""

    class Killed(BaseException):
        """The worker process dies here."""

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
        ids = accept_batch(first.pairs, [attack_body() for _ in range(6)])
        killer.append(ids[2])
        first.take(DISPATCH_QUEUE)
        with pytest.raises(Killed):
            first.take(QUEUE)
    assert [state(scheduler, e, "a.apply") for e in ids] == ["done"] * 2 + ["running"] * 4

    timeline.t += LEASE_S + 1
    sweep_once(scheduler, batch_settings)
    with worker_of(db, batch_settings, timeline, handler) as second:
        outcomes = second.take(QUEUE)

    assert outcomes == dict.fromkeys(ids[2:], "ok")
    assert runs == Counter({**dict.fromkeys(ids, 1), ids[2]: 2})
    assert [state(scheduler, e, "a.apply") for e in ids] == ["done"] * 6
    assert audit(db) == []


def test_events_of_one_entity_in_a_batch_apply_in_version_order(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """Three updates of one entity arrive newest first, in one batch: each applies, oldest to
    newest, rather than the newest first and the two others skipped as stale."""
    applied: list[int] = []

    def version(event: UnknownEvent, event_id: str) -> Version:
        return Version("thing:1", int(event.created.timestamp()), UPDATE, event_id)

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        applied.append(int(event.created.timestamp()))

    handler = attack_handler("a.apply", apply, order_key=version, ordered=True)
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        bodies = [
            orjson.dumps({"type": ATTACK_TYPE, "created": f"2025-05-01 10:00:0{n}", "data": {}})
            for n in (3, 1, 2)
        ]
        ids = accept_batch(worker.pairs, bodies)
        worker.take(DISPATCH_QUEUE)
        assert [sorted(m["ids"]) for m in messages(db, QUEUE)] == [sorted(ids)]
        outcomes = worker.take(QUEUE)

    oldest = int(dt.datetime(2025, 5, 1, 10, 0, 1, tzinfo=dt.UTC).timestamp())
    assert applied == [oldest, oldest + 1, oldest + 2]
    assert outcomes == dict.fromkeys(ids, "ok")
    assert audit(db) == []


def test_an_async_handler_runs_a_batch_concurrently_at_most_its_cap_at_once(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    in_flight = 0
    most = 0
    done: list[str] = []

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        done.append(ctx.event_id)

    handler = attack_handler("a.call", call, concurrency=5)
    with worker_of(db, batch_settings, timeline, handler) as worker:
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(20)])
        worker.take(DISPATCH_QUEUE)
        outcomes = worker.take(QUEUE)

    assert most == 5
    assert sorted(done) == sorted(ids)
    assert outcomes == dict.fromkeys(ids, "ok")
    assert audit(db) == []


def test_a_failing_async_event_is_retried_alone(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    bad: list[str] = []

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        await asyncio.sleep(0)
        if ctx.event_id in bad:
            raise RuntimeError("refused")

    with worker_of(db, batch_settings, timeline, attack_handler("a.call", call)) as worker:
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(4)])
        bad.append(ids[1])
        worker.take(DISPATCH_QUEUE)
        outcomes = worker.take(QUEUE)

    assert outcomes == {**dict.fromkeys(ids, "ok"), ids[1]: "retry_scheduled"}
    assert audit(db) == []


def test_a_dispatching_worker_runs_a_handlers_new_message_itself_when_nothing_waits(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    done: list[str] = []
    handler = attack_handler("a.apply", lambda event, ctx: done.append(ctx.event_id))
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(3)])
        worker.take(DISPATCH_QUEUE, run_here=[QUEUE])

        # Run in the dispatch's task: no handler message left for another task.
        assert sorted(done) == sorted(ids)
        assert db.llen(QUEUE) == 0

        # A worker that does not consume the handler's queue leaves the message to it.
        more = accept_batch(worker.pairs, [attack_body()])
        worker.take(DISPATCH_QUEUE, run_here=["elsewhere"])
        assert [m["ids"] for m in messages(db, QUEUE)] == [more]

        # And with a message already waiting on the queue, the new one waits its turn.
        newest = accept_batch(worker.pairs, [attack_body()])
        worker.take(DISPATCH_QUEUE, run_here=[QUEUE])
        assert [m["ids"] for m in messages(db, QUEUE)] == [newest, more]
    assert sorted(done) == sorted(ids)
    assert audit(db) == []


def test_a_batch_out_of_time_hands_back_what_it_has_not_run_without_spending_an_attempt(
    db: redis.Redis, make_settings: Callable[..., Settings], timeline: Timeline
) -> None:
    """A one-second task time limit leaves a batch about half a second (half the soft limit).
    A handler known to be fast turns slow (0.3 s an event): two run, the others go back to
    wait, their attempt unspent."""
    settings = make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S, task_time_limit_s=1)
    runs: Counter[str] = Counter()

    def slow(event: UnknownEvent, ctx: HandlerContext) -> None:
        runs[ctx.event_id] += 1
        time.sleep(0.3)

    scheduler = process(db, settings, timeline)
    with worker_of(db, settings, timeline, attack_handler("a.slow", slow)) as worker:
        known_fast(db, "a.slow")
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(4)])
        worker.take(DISPATCH_QUEUE)
        outcomes = worker.take(QUEUE)

    assert list(outcomes.values()) == ["ok", "ok", "deferred", "deferred"]
    for event_id in ids[2:]:
        pair = scheduler.states(event_id)["a.slow"]
        assert (pair.state, pair.attempt, pair.starts) == ("waiting", 1, 0)
        assert db.zscore("calhook:due", due_member(event_id, "a.slow")) is not None
    assert runs == Counter(ids[:2])
    assert audit(db) == []


def test_a_sync_handlers_messages_name_what_it_runs_in_about_50_ms(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """A sync handler runs its batch one event after another: a slow one gets an event per
    message (and keeps its pool's parallelism), a fast one full messages, one of unknown cost
    one event until its first ending; an async handler's events run at once: full messages."""

    async def remote(event: UnknownEvent, ctx: HandlerContext) -> None:
        await asyncio.sleep(0)

    handlers = [
        attack_handler("a.new", lambda event, ctx: None, queue="new"),
        attack_handler("a.slow", lambda event, ctx: None, queue="slow"),
        attack_handler("a.mid", lambda event, ctx: None, queue="mid"),
        attack_handler("a.fast", lambda event, ctx: None, queue="fast"),
        attack_handler("a.async", remote, queue="async"),
    ]
    db.hset(duration_key("a.slow"), "cost", "0.05")
    db.hset(duration_key("a.mid"), "cost", "0.01")
    known_fast(db, "a.fast")
    with worker_of(db, batch_settings, timeline, *handlers) as worker:
        accept_batch(worker.pairs, [attack_body() for _ in range(12)])
        worker.take(DISPATCH_QUEUE)

    def sizes(queue: str) -> list[int]:
        return [len(m["ids"]) for m in messages(db, queue)]

    assert sizes("new") == [1] * 12
    assert sizes("slow") == [1] * 12
    assert sizes("mid") == [2, 5, 5]  # 50 ms / 10 ms, the last message first
    assert sizes("fast") == [12]
    assert sizes("async") == [12]


def test_pairs_a_dispatch_kept_to_run_itself_are_queued_by_the_sweep_if_it_dies_first(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """fan_out queues no message for the pairs the dispatching worker runs itself. If that
    worker dies between the fan-out and their start, the sweep finds them queued with no
    message (none waiting, none held) after CALHOOK_RECOVERY_S and queues one: run once."""

    class Killed(BaseException):
        """The worker process dies here."""

    runs: Counter[str] = Counter()
    handler = attack_handler("a.apply", lambda event, ctx: runs.update([ctx.event_id]))
    scheduler = process(db, batch_settings, timeline)
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(3)])

        def die(*args: Any, **kwargs: Any) -> dict[str, str]:
            raise Killed

        worker.runner.run = die  # type: ignore[method-assign]
        with pytest.raises(Killed):
            worker.take(DISPATCH_QUEUE, run_here=[QUEUE])
    assert db.llen(QUEUE) == 0
    assert [state(scheduler, e, "a.apply") for e in ids] == ["queued"] * 3

    timeline.t += RECOVER_S + 1
    assert sweep_once(scheduler, batch_settings) > 0
    with worker_of(db, batch_settings, timeline, handler) as second:
        assert second.take(QUEUE) == dict.fromkeys(ids, "ok")
    assert runs == Counter(ids)
    assert audit(db) == []


def test_a_dispatch_running_its_handlers_pairs_itself_does_not_parse_the_events_again(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatch parsed each event (models are frozen); the pairs it runs itself get that
    event, not a second parse."""
    seen: list[str] = []
    handler = attack_handler("a.apply", lambda event, ctx: seen.append(ctx.event_id))
    with worker_of(db, batch_settings, timeline, handler) as worker:
        known_fast(db, "a.apply")
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(3)])

        def no_second_parse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("parsed again")

        monkeypatch.setattr("workers.runner.parse_event", no_second_parse)
        worker.take(DISPATCH_QUEUE, run_here=[QUEUE])
    assert sorted(seen) == sorted(ids)
    assert audit(db) == []


def test_a_dispatch_runs_itself_one_batch_of_a_slow_sync_handler_and_queues_the_rest(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """A slow sync handler's batch is one event: the dispatch runs one itself and queues the
    others, one per message, for the other threads and workers."""
    done: list[str] = []
    handler = attack_handler("a.slow", lambda event, ctx: done.append(ctx.event_id))
    db.hset(duration_key("a.slow"), "cost", "0.05")
    with worker_of(db, batch_settings, timeline, handler) as worker:
        ids = accept_batch(worker.pairs, [attack_body() for _ in range(4)])
        worker.take(DISPATCH_QUEUE, run_here=[QUEUE])
    assert len(done) == 1
    assert sorted([*done, *(m["ids"][0] for m in messages(db, QUEUE))]) == sorted(ids)
    assert [len(m["ids"]) for m in messages(db, QUEUE)] == [1, 1, 1]


def test_an_async_handler_raising_system_exit_does_not_stop_the_process_loop(
    db: redis.Redis, batch_settings: Settings, timeline: Timeline
) -> None:
    """asyncio re-raises SystemExit out of the loop; the process's loop runs on, so the next
    async batch of the process still runs."""
    exits: list[str] = []

    async def call(event: UnknownEvent, ctx: HandlerContext) -> None:
        if not exits:
            exits.append(ctx.event_id)
            raise SystemExit(3)

    with worker_of(db, batch_settings, timeline, attack_handler("a.call", call)) as worker:
        accept_batch(worker.pairs, [attack_body()])
        worker.take(DISPATCH_QUEUE)
        with contextlib.suppress(BaseException):
            worker.take(QUEUE)
        later_ids = accept_batch(worker.pairs, [attack_body()])
        worker.take(DISPATCH_QUEUE)
        assert worker.take(QUEUE) == dict.fromkeys(later_ids, "ok")
