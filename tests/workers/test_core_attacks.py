"""Attacks on the delivery core (docs/delivery.md): each test drives the real scripts, and where
it matters the real runner, dispatcher and scheduler sweep, step by step against a real Redis,
trying to break one of its guarantees. A test that found a break asserts the right behaviour.

Time is an argument: each "process" of a test (a worker, the scheduler, an operator) gets a
:class:`PairStore` whose clock reads a shared :class:`Timeline` (plus its own skew), so "a lease
later" or "a scheduler 45 s ahead" is a number, not a sleep. A database of its own (14): the
session's worker never takes these messages.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis
from kombu import Connection

from calhook.constants import DISPATCH_QUEUE, DISPATCH_TASK
from calhook.ids import new_event_id
from calhook.messages import read_task_message
from calhook.settings import Settings
from calhook.store.connect import clock, pair_store
from calhook.store.keys import (
    DEAD,
    DISPATCH_PAIR,
    DUE,
    OPEN_STATES,
    PARKED,
    SEQ,
    UNACKED,
    body_key,
    due_member,
    event_key,
    order_key,
    pairs_key,
)
from calhook.store.pairs import Ending, PairStore, ReplayError, Route
from calhook.store.queues import throughput_key
from calhook.store.records import DEAD as DEAD_KIND
from calhook.store.records import RecordStore
from calhook.store.scripts import source
from schemas import UnknownEvent
from tests.support import store
from tests.support.core_rig import (
    CRM,
    LEASE_S,
    NOTIFY,
    RECOVER_S,
    Timeline,
    Worker,
    accept_batch,
    attack_body,
    attack_handler,
    attack_registry,
    audit,
    copies,
    finish,
    later,
    process,
    routed,
    start,
    state,
    take,
)
from workers import legacy
from workers.forget import forget_customer
from workers.ordering import UPDATE, Version
from workers.registry import HandlerContext, Registry
from workers.scheduler import sweep_once, sweep_retention

# tenacity 9.2 deprecates wait_exponential_jitter(initial=...), which the runner passes; with
# warnings as errors the runner would fail between a handler's effect and its finish.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The 'initial' parameter is deprecated:DeprecationWarning"
)


# --- records: purge, replay and retention at once --------------------------------------------


def two_dead_letters(core: PairStore) -> tuple[str, str, str]:
    """An event whose two handlers both ended dead: two records need its body."""
    event_id = store.accept(core)
    store.route(core, event_id, [CRM, NOTIFY])
    for h, q in (CRM, NOTIFY):
        dead = Ending(event_id, "dead", "dead_permanent", reason="permanent", error="no")
        assert store.end(core, h, q, dead) == "ok"
    return event_id, f"{event_id}.{CRM[0]}", f"{event_id}.{NOTIFY[0]}"


def test_a_record_purged_by_two_operators_leaves_the_body_the_other_record_needs(
    db: redis.Redis, core: PairStore
) -> None:
    """Two operators purge the same dead letter (each listed it before the other purged, as
    `calhook dlq purge --all` does). The second purge finds no record but still takes one off
    the event's `keep` count, so the body goes while the event's other dead letter needs it: that
    one can no longer be replayed."""
    event_id, crm_record, notify_record = two_dead_letters(core)

    assert core.purge("dead", [crm_record]) == 1
    assert core.purge("dead", [crm_record]) == 0  # the second operator's purge

    assert db.exists(body_key(event_id)), "the body went while a dead letter needs it"
    assert core.replay("dead", notify_record) == NOTIFY[1]
    assert audit(db) == []


def test_a_purge_of_a_record_just_replayed_leaves_the_body_the_other_record_needs(
    db: redis.Redis, core: PairStore
) -> None:
    """Purge of a dead letter while its pair is being replayed: operator A replays the crm
    record, operator B purges it from the list he read a moment before. B's purge finds no
    record and still lowers `keep`; once the replayed pair is done, the event settles with
    keep 0 and its body is deleted, though the notify dead letter still needs it."""
    event_id, crm_record, notify_record = two_dead_letters(core)

    assert core.replay("dead", crm_record) == CRM[1]
    assert core.purge("dead", [crm_record]) == 0
    assert store.end(core, CRM[0], CRM[1], Ending(event_id, "done", "ok")) == "ok"

    assert db.exists(body_key(event_id)), "the body went while a dead letter needs it"
    assert core.replay("dead", notify_record) == NOTIFY[1]
    assert audit(db) == []


def test_retention_does_not_erase_a_dead_letter_written_again_after_a_replay(
    db: redis.Redis, settings: Settings
) -> None:
    """Retention trimming a record whose pair was replayed: the scheduler's retention reads
    the index entries past the retention, then purges them. In between, an operator replays
    one and its pair fails for good again at once: a fresh dead letter with the same id. The
    purge erases the fresh record (and its body), which is nowhere near the retention."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    event_id = store.accept(core)
    store.dead_letter(core, event_id, *CRM)
    record_id = f"{event_id}.{CRM[0]}"
    timeline.t += settings.retention_s + 10  # the record is past the retention now
    purge = core.purge

    def operator_acts_first(
        kind: str, record_ids: Sequence[str], stored_before: float | None = None
    ) -> int:
        if record_id in record_ids and core.purge is not purge:
            core.purge = purge  # type: ignore[method-assign]
            assert core.replay("dead", record_id) == CRM[1]
            dead = Ending(event_id, "dead", "dead_permanent", reason="permanent", error="again")
            assert store.end(core, CRM[0], CRM[1], dead) == "ok"
        return purge(kind, record_ids, stored_before)

    core.purge = operator_acts_first  # type: ignore[method-assign]
    sweep_retention(core, settings, now_s=timeline.t)

    fresh = RecordStore(db, DEAD_KIND).get(record_id)
    assert fresh is not None, "a fresh dead letter was erased"
    assert fresh["error"] == "again"
    assert db.exists(body_key(event_id))


# --- order per entity ------------------------------------------------------------------------


def test_a_delete_deferred_by_a_rate_limit_is_not_skipped_by_a_newer_update(
    db: redis.Redis, core: PairStore
) -> None:
    """A deleted entity revived by an update: customer.deleted (created 200) starts, and the
    CRM's rate limit defers it (waiting releases the entity's lock, rightly). A booking with
    the customer's snapshot (an update, created 300) takes the free lock, upserts the customer
    and commits 300. When the delete comes back it is older than 300: skipped as stale. The
    CRM keeps a customer Calenso deleted, and every later update applies too. Applying the
    events in version order would have left it deleted (only a newer create revives it)."""
    entity = "crm:customer:c1"
    delete = routed(core, [CRM], entity, "200|2|d")
    update = routed(core, [CRM], entity, "300|1|u")
    assert start(core, CRM[0], [delete], "w1", CRM[1]) == ["run"]
    assert finish(core, "w1", Ending(delete, "defer", "deferred", delay_s=1)) == "ok"
    assert start(core, CRM[0], [update], "w2", CRM[1]) == ["run"]
    assert finish(core, "w2", Ending(update, "done", "ok")) == "ok"

    core.sweep(limit=100, batch_max=1, now_s=later(2))
    outcome = start(core, CRM[0], [delete], "w3", CRM[1])
    if outcome == ["run"]:
        assert finish(core, "w3", Ending(delete, "done", "ok")) == "ok"
    newest = routed(core, [CRM], entity, "400|1|n")

    assert outcome == ["run"], "the delete was never applied"
    assert start(core, CRM[0], [newest], "w4", CRM[1]) == ["stale"], "an update revived it"


def test_two_ordered_handlers_sharing_a_scope_both_apply_the_same_event(
    db: redis.Redis, settings: Settings
) -> None:
    """An event routed to two ordered handlers of one `order_scope` (the registry's way to
    make them share versions): the first applies it and commits its version; the second then
    finds the same version applied and ends stale, so its effect never happens."""
    applied: list[str] = []

    def version(event: UnknownEvent, event_id: str) -> Version:
        return Version("thing:1", int(event.created.timestamp()), UPDATE, event_id)

    def effect(name: str) -> Callable[[Any, HandlerContext], None]:
        return lambda event, ctx: applied.append(name)

    registry = attack_registry(
        attack_handler(
            "a.first", effect("a.first"), order_key=version, order_scope="s", ordered=True
        ),
        attack_handler(
            "a.second", effect("a.second"), order_key=version, order_scope="s", ordered=True
        ),
    )
    worker = Worker(db, process(db, settings, Timeline()), registry, settings)
    try:
        (_event_id,) = accept_batch(worker.pairs, [attack_body()])
        worker.take(DISPATCH_QUEUE)
        worker.take("attack")
        worker.take("attack")
    finally:
        worker.stop()

    assert sorted(applied) == ["a.first", "a.second"]


def test_a_late_done_of_a_run_that_lost_its_lease_does_not_free_the_entity_for_a_newer_event(
    db: redis.Redis, core: PairStore
) -> None:
    """Worker A runs the older event of an entity and stalls past its lease; B takes the pair
    over (and the entity's lock, whose value is the pair, not the run). A's late `done` is
    accepted (the effect happened) and releases the lock B is holding, so the newer event of
    the entity starts while B is still applying the older one: B's older version lands after
    the newer one. (The documented stall allows both effects, not a broken order.)"""
    entity = "crm:customer:c1"
    older = routed(core, [CRM], entity, "100|1|a")
    newer = routed(core, [CRM], entity, "200|1|b")
    assert start(core, CRM[0], [older], "A", CRM[1]) == ["run"]
    core.sweep(limit=100, batch_max=1, now_s=later(LEASE_S + 1))  # A stalled
    assert start(core, CRM[0], [older], "B", CRM[1]) == ["run"]

    assert finish(core, "A", Ending(older, "done", "ok")) == "ok"

    assert start(core, CRM[0], [newer], "C", CRM[1]) == ["deferred"], "B still applies v100"


def test_a_replayed_dead_letter_of_an_ordered_handler_is_still_ordered(
    db: redis.Redis, core: PairStore
) -> None:
    """An older customer.updated ends dead (a permanent error); a newer one is applied. The
    operator fixes the cause and replays the dead letter: the pair runs again, but closing it
    had dropped its order entity and version (close_pair), so it now runs unordered and
    writes the older customer over the newer one."""
    entity = "crm:customer:c1"
    older = routed(core, [CRM], entity, "100|1|a")
    newer = routed(core, [CRM], entity, "200|1|b")
    assert start(core, CRM[0], [older], "w1", CRM[1]) == ["run"]
    dead = Ending(older, "dead", "dead_permanent", reason="permanent", error="400")
    assert finish(core, "w1", dead) == "ok"
    assert start(core, CRM[0], [newer], "w2", CRM[1]) == ["run"]
    assert finish(core, "w2", Ending(newer, "done", "ok")) == "ok"

    assert core.replay("dead", f"{older}.{CRM[0]}") == CRM[1]

    assert start(core, CRM[0], [older], "w3", CRM[1]) == ["stale"]


# --- clocks ----------------------------------------------------------------------------------


def test_a_scheduler_clock_ahead_of_the_workers_does_not_run_a_live_pair_twice(
    db: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clock skew: a scheduler host whose clock runs 45 s ahead (less than the 60 s lease) must
    not see a healthy worker's lease as over. The scripts take the time from Redis, never from
    the host, so the host's clock does not enter into it."""
    store = pair_store(db, settings)
    event_id = routed(store, [CRM])
    db.delete(CRM[1])
    assert start(store, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    assert store.renew("w1", [due_member(event_id, CRM[0])]) == []  # the heartbeat beats
    skewed = time.time() + 45
    monkeypatch.setattr(time, "time", lambda: skewed)  # the scheduler's host

    swept = sweep_once(store, settings)

    assert swept == 0, "a live run was queued again"
    assert db.llen(CRM[1]) == 0
    assert start(store, CRM[0], [event_id], "w2", CRM[1]) == ["busy"]


# --- batches of events in one message ---------------------------------------------------------


@pytest.fixture
def batch_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S, batch_max=3)


def test_a_handler_message_of_several_events_does_not_run_a_later_one_twice(
    db: redis.Redis, batch_settings: Settings
) -> None:
    """With CALHOOK_BATCH_MAX > 1 one message names two events. The first takes
    longer than the lease (a slow CRM, its quick retries) while the heartbeat renews what the
    worker holds, and the scheduler sweeps all along; another worker takes whatever the sweep
    queues. The second event must still run once: no pair of the message may sit started
    under a lease nobody renews (the runner used to start every event of a message at once).
    """
    timeline = Timeline()
    effects: Counter[str] = Counter()
    registry = Registry()
    worker = Worker(db, process(db, batch_settings, timeline), registry, batch_settings)
    other = Worker(db, process(db, batch_settings, timeline), registry, batch_settings)
    scheduler = process(db, batch_settings, timeline)
    slow: list[str] = []

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        effects[ctx.event_id] += 1
        if ctx.event_id == slow[0] and effects[ctx.event_id] == 1:
            for _ in range(4):  # 80 s of work, the heartbeat beating every 20 s
                timeline.t += LEASE_S / 3
                assert worker.beat() == []
                sweep_once(scheduler, batch_settings)
            if db.llen("attack"):
                other.take("attack")

    registry.register(attack_handler("a.apply", apply))
    try:
        first, second = accept_batch(worker.pairs, [attack_body(), attack_body()])
        slow.append(first)
        worker.take(DISPATCH_QUEUE)
        assert copies(db, "attack", first) == copies(db, "attack", second) == 1
        worker.take("attack")
    finally:
        worker.stop()
        other.stop()

    assert effects == {first: 1, second: 1}


def test_events_of_a_batch_whose_handler_never_started_are_not_poisoned_by_their_neighbour(
    db: redis.Redis, batch_settings: Settings
) -> None:
    """Poison must count only runs that started the handler and never finished. With
    CALHOOK_BATCH_MAX > 1 one message names three events, and the first kills its
    worker every time. The two others must end done, each run once, not dead as poison
    (when start.lua started the whole message at once, each crash counted for all three).
    """

    class Killed(BaseException):
        """The worker process dies here: no finish, no ack."""

    timeline = Timeline()
    runs: Counter[str] = Counter()
    killer: list[str] = []

    def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
        runs[ctx.event_id] += 1
        if ctx.event_id == killer[0]:
            raise Killed

    registry = attack_registry(attack_handler("a.apply", apply))
    scheduler = process(db, batch_settings, timeline)
    workers: list[Worker] = []
    try:
        ids = accept_batch(scheduler, [attack_body() for _ in range(3)])
        killer.append(ids[0])
        boot = Worker(db, process(db, batch_settings, timeline), registry, batch_settings)
        workers.append(boot)
        boot.take(DISPATCH_QUEUE)
        for _ in range(20):
            if not db.llen("attack"):
                timeline.t += LEASE_S + 1
                sweep_once(scheduler, batch_settings)
                continue
            worker = Worker(db, process(db, batch_settings, timeline), registry, batch_settings)
            workers.append(worker)
            with contextlib.suppress(Killed):
                worker.take("attack")
    finally:
        for w in workers:
            w.stop()

    def story(event_id: str) -> tuple[str, int, str]:
        record = RecordStore(db, DEAD_KIND).get(f"{event_id}.a.apply", with_body=False) or {}
        return state(scheduler, event_id, "a.apply"), runs[event_id], record.get("reason", "")

    assert story(ids[0]) == ("dead", batch_settings.max_deliveries, "poison")
    # (state, handler runs, dead-letter reason) of the two innocent events
    assert [story(e) for e in ids[1:]] == [("done", 1, "")] * 2


# --- the upgrade from calhook 0.1 -------------------------------------------------------------


def test_legacy_messages_of_two_handlers_for_one_event_both_run(
    db: redis.Redis, core: PairStore
) -> None:
    """calhook 0.1 fanned each event out as one message per handler, each carrying the event.
    At the upgrade both messages of an event are taken over: the first stores the event and
    routes it to its handler (through the event's dispatch); the second finds the event stored
    and its dispatch done, and routes nothing: that handler's work is lost."""
    kwargs = {"event_id": "old-1", "body": "{}", "endpoint": "default", "received_at": 1.0}

    legacy.take_over(core, kwargs, CRM[0], CRM[1])
    legacy.take_over(core, kwargs, NOTIFY[0], NOTIFY[1])

    assert state(core, "old-1", CRM[0]) == "queued"
    assert state(core, "old-1", NOTIFY[0]) == "queued"
    assert copies(db, NOTIFY[1], "old-1") == 1


# --- what held ---------------------------------------------------------------------------------


@pytest.mark.parametrize("do", ["done", "retry", "defer", "dead"])
def test_a_finish_retried_after_its_reply_was_lost_changes_nothing_the_second_time(
    db: redis.Redis, core: PairStore, do: str
) -> None:
    """The runner retries finish on a Redis error; the first call may have run, its reply lost."""
    event_id = routed(core, [CRM], "crm:customer:c1", "100|1|a")
    assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    ending = Ending(event_id, do, "x", delay_s=30, reason="permanent", error="no")
    assert finish(core, "w1", ending) == "ok"
    before = (core.states(event_id), db.hgetall(event_key(event_id)), audit(db))
    stored = {k: db.type(k) for k in db.scan_iter("calhook:*")}

    assert finish(core, "w1", ending) == ("late" if do in ("done", "dead") else "lost")

    after_fields = db.hgetall(event_key(event_id))
    assert (core.states(event_id), after_fields, audit(db)) == before
    assert {k: db.type(k) for k in db.scan_iter("calhook:*")} == stored
    assert db.zcard(DEAD) == (1 if do == "dead" else 0)
    assert not db.exists(f"{order_key('crm', 'customer:c1')}:lock")


def test_a_dispatch_whose_worker_died_between_start_and_fan_out_routes_each_event_once(
    db: redis.Redis, core: PairStore
) -> None:
    """A dispatch batch where the worker (A) dies after start and before fan_out, or stalls
    and fans out late while B dispatches the same events again."""
    events = accept_batch(core, [b"{}", b"{}", b"{}"])
    kwargs = take(db, DISPATCH_QUEUE)
    assert (
        start(core, DISPATCH_PAIR, kwargs["ids"], "A", DISPATCH_QUEUE, seq=kwargs["seq"])
        == ["run"] * 3
    )

    swept = core.sweep(limit=100, batch_max=1, now_s=later(LEASE_S + 1))
    assert swept.expired == 3
    assert db.llen(DISPATCH_QUEUE) == 3
    kwargs = take(db, DISPATCH_QUEUE)
    assert start(core, DISPATCH_PAIR, kwargs["ids"], "B", DISPATCH_QUEUE, seq=kwargs["seq"]) == [
        "run"
    ]

    received = orjson.dumps({"at": time.time(), "what": "received"})

    def route(e: str) -> Route:
        return Route(e, "x", received, [(CRM[0], CRM[1], "", ""), (NOTIFY[0], NOTIFY[1], "", "")])

    assert core.fan_out(throughput_key(DISPATCH_QUEUE), 1, [route(e) for e in events]) == ["ok"] * 3
    assert core.fan_out(throughput_key(DISPATCH_QUEUE), 1, [route(kwargs["ids"][0])]) == ["late"]
    while db.llen(DISPATCH_QUEUE):
        kwargs = take(db, DISPATCH_QUEUE)
        assert start(core, DISPATCH_PAIR, kwargs["ids"], "C", DISPATCH_QUEUE) == ["done"]

    for e in events:
        assert copies(db, CRM[1], e) == copies(db, NOTIFY[1], e) == 1
        assert core.states(e)[DISPATCH_PAIR].starts in (1, 2)
    assert audit(db) == []


def test_a_poisoned_dispatch_replayed_is_dispatched_once(db: redis.Redis, core: PairStore) -> None:
    """Replay of the dead letter of the dispatch pair ("@dispatch", poison)."""
    event_id = store.accept(core)
    for n in range(6):
        db.delete(DISPATCH_QUEUE)
        what = start(core, DISPATCH_PAIR, [event_id], f"w{n}", DISPATCH_QUEUE)
        core.sweep(limit=100, batch_max=1, now_s=later((n + 1) * (LEASE_S + 1)))
    assert what == ["poison"]
    record_id = f"{event_id}.{DISPATCH_PAIR}"
    assert RecordStore(db, DEAD_KIND).get(record_id) is not None
    assert db.exists(body_key(event_id))

    assert core.replay("dead", record_id) == DISPATCH_QUEUE
    with pytest.raises(ReplayError):
        core.replay("dead", record_id)

    (raw,) = db.lrange(DISPATCH_QUEUE, 0, -1)
    task, _, kwargs, _ = read_task_message(raw)
    assert (task, kwargs["ids"]) == (DISPATCH_TASK, [event_id])
    assert core.states(event_id)[DISPATCH_PAIR].attempt == 1
    assert core.states(event_id)[DISPATCH_PAIR].starts == 0
    assert audit(db) == []
    store.route(core, event_id, [CRM])
    assert store.end(core, *CRM, Ending(event_id, "done", "ok")) == "ok"
    assert not db.exists(body_key(event_id))
    assert db.zcard(DEAD) == 0
    assert audit(db) == []


def test_forget_while_an_ordered_handler_runs_refuses_its_outcome_and_leaves_nothing(
    db: redis.Redis, core: PairStore
) -> None:
    event_id = routed(core, [CRM, NOTIFY], "crm:customer:c1", "100|1|a")
    assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    lock = f"{order_key('crm', 'customer:c1')}:lock"
    assert db.exists(lock)

    assert core.forget([event_id]) == (1, 2, 0)

    assert core.renew("w1", [due_member(event_id, CRM[0])]) == [due_member(event_id, CRM[0])]
    assert finish(core, "w1", Ending(event_id, "done", "ok")) == "late"
    assert finish(core, "w1", Ending(event_id, "dead", "x", reason="permanent")) == "late"
    assert start(core, NOTIFY[0], [event_id], "w2", NOTIFY[1]) == ["gone"]
    assert not db.exists(
        lock, order_key("crm", "customer:c1"), event_key(event_id), body_key(event_id)
    )
    assert db.zcard(DUE) == db.zcard(DEAD) == 0
    assert core.sweep(limit=100, batch_max=1, now_s=later(3600)).queued == 0
    assert audit(db) == []
    assert all(int(v) == 0 for s in OPEN_STATES for v in db.hvals(pairs_key(s)))


def test_forget_while_its_dispatch_runs_creates_no_pair(db: redis.Redis, core: PairStore) -> None:
    event_id = store.accept(core)
    assert start(core, DISPATCH_PAIR, [event_id], "w1", DISPATCH_QUEUE) == ["run"]
    assert core.forget([event_id]) == (1, 1, 0)

    received = orjson.dumps({"at": time.time(), "what": "received"})
    route = Route(event_id, "x", received, [(CRM[0], CRM[1], "", "")])
    assert core.fan_out(throughput_key(DISPATCH_QUEUE), 1, [route]) == ["late"]
    parked = Route(event_id, "x", received, park_reason="unknown_type")
    assert core.fan_out(throughput_key(DISPATCH_QUEUE), 1, [parked]) == ["late"]

    assert not db.exists(event_key(event_id), CRM[1])
    assert db.zcard(PARKED) == 0
    assert audit(db) == []


@pytest.mark.parametrize("ending", ["defer", "retry", "dead", "expired"])
def test_a_newer_event_waiting_for_the_lock_runs_once_the_holder_lets_go_and_the_holder_is_stale(
    db: redis.Redis, core: PairStore, ending: str
) -> None:
    """Ordered pairs whose lock holder is deferred, retried, dead, or whose worker died."""
    entity = "crm:customer:c1"
    older = routed(core, [CRM], entity, "100|1|a")
    newer = routed(core, [CRM], entity, "200|1|b")
    assert start(core, CRM[0], [older], "w1", CRM[1]) == ["run"]
    for n in range(3):
        assert start(core, CRM[0], [newer], "w2", CRM[1]) in (["deferred"], ["early"])
        core.sweep(limit=100, batch_max=1, now_s=later(1.5 * (n + 1)))

    if ending == "expired":
        core.sweep(limit=100, batch_max=1, now_s=later(LEASE_S + 1))
        db.delete(f"{order_key('crm', 'customer:c1')}:lock")  # its PX ran out with the lease
    elif ending == "dead":
        assert (
            finish(core, "w1", Ending(older, "dead", "dead_permanent", reason="permanent")) == "ok"
        )
    else:
        assert finish(core, "w1", Ending(older, ending, ending, delay_s=30)) == "ok"
    core.sweep(limit=100, batch_max=1, now_s=later(10))
    assert start(core, CRM[0], [newer], "w3", CRM[1]) == ["run"]
    assert finish(core, "w3", Ending(newer, "done", "ok")) == "ok"
    core.sweep(limit=100, batch_max=1, now_s=later(2 * LEASE_S))

    assert core.states(newer)[CRM[0]].attempt == 1
    if ending != "dead":
        assert start(core, CRM[0], [older], "w4", CRM[1]) == ["stale"]
    assert db.hget(order_key("crm", "customer:c1"), "event_id") == b"b"
    assert audit(db) == []


def test_an_event_routed_to_one_handler_twice_and_named_twice_in_a_message_runs_once(
    db: redis.Redis, core: PairStore
) -> None:
    """An event routed to a handler with the same name twice (and a message naming it twice)."""
    event_id = store.accept(core)
    assert start(core, DISPATCH_PAIR, [event_id, event_id], "w1", DISPATCH_QUEUE) == ["run", "busy"]
    received = orjson.dumps({"at": time.time(), "what": "received"})
    twice = [(CRM[0], CRM[1], "", ""), (CRM[0], "elsewhere", "", ""), (CRM[0], CRM[1], "", "")]
    assert core.fan_out(
        throughput_key(DISPATCH_QUEUE), 5, [Route(event_id, "x", received, twice)]
    ) == ["ok"]
    assert copies(db, CRM[1], event_id) == 1
    assert not db.exists("elsewhere")
    assert db.hget(event_key(event_id), "open") == b"1"

    assert start(core, CRM[0], [event_id, event_id], "w2", CRM[1]) == ["run", "busy"]
    assert core.states(event_id)[CRM[0]].starts == 1
    assert finish(core, "w2", Ending(event_id, "done", "ok")) == "ok"
    assert audit(db) == []
    assert not db.exists(body_key(event_id))


def test_a_message_kombu_requeues_behind_newer_ones_gets_at_most_one_copy_and_runs_once(
    db: redis.Redis, url: str, core: PairStore
) -> None:
    """kombu's reject(requeue=True) (calhook's task failed before start: a Redis blip) puts
    the message back at the far end, with a modified payload, behind newer messages. Workers
    take those, so calhook:taken passes its number and the sweep calls it lost: one copy.
    More sweeps add none, and the two copies run the pair once."""
    first = routed(core, [CRM])
    others = [routed(core, [CRM]) for _ in range(3)]
    with Connection(url) as conn:
        channel: Any = conn.default_channel
        message = channel.basic_get(CRM[1])
        assert message is not None
        assert message.delivery_tag == f"{CRM[1]}.1"
        assert db.hexists(UNACKED, message.delivery_tag)
        message.reject(requeue=True)
    assert not db.hexists(UNACKED, f"{CRM[1]}.1")
    back: Any = db.lindex(CRM[1], 0)
    assert orjson.loads(back)["headers"]["redelivered"] is True
    for e in others:
        kwargs = take(db, CRM[1])
        assert kwargs["ids"] == [e]
        assert start(core, CRM[0], [e], "w1", CRM[1], seq=kwargs["seq"]) == ["run"]
        assert finish(core, "w1", Ending(e, "done", "ok")) == "ok"

    for hours in range(1, 6):
        core.sweep(limit=100, batch_max=1, now_s=later(hours * 3600))
    assert copies(db, CRM[1], first) == 2

    outcomes: list[str] = []
    while db.llen(CRM[1]):
        kwargs = take(db, CRM[1])
        outcomes += start(core, CRM[0], kwargs["ids"], "w2", CRM[1], seq=kwargs["seq"])
        if outcomes[-1] == "run":
            assert finish(core, "w2", Ending(first, "done", "ok")) == "ok"
    assert sorted(outcomes) == ["done", "run"]
    assert audit(db) == []
    assert db.zcard(DUE) == 0


def test_a_message_held_by_a_dead_worker_gets_one_copy_and_kombus_restore_runs_nothing_twice(
    db: redis.Redis, url: str, core: PairStore, settings: Settings
) -> None:
    """A worker takes a message into kombu's unacked hash and dies before starting it. While a
    live worker could still be holding it, the sweep sees it pending; then it queues one copy
    and no more, however long; kombu's restore_visible later puts the original back (with a
    modified payload) at the head of the queue, and the pair runs once."""
    event_id = routed(core, [CRM])
    hold_s = settings.task_time_limit_s + settings.recovery_s
    with Connection(url, transport_options={"visibility_timeout": 0}) as conn:
        channel: Any = conn.default_channel
        channel.do_restore = False  # the worker is killed: nothing restored at its end
        assert channel.basic_get(CRM[1]) is not None
        swept = core.sweep(limit=100, batch_max=1, hold_s=hold_s, now_s=later(hold_s - 5))
        assert (swept.lost, swept.pending) == (0, 1)
        for minutes in range(7, 120, 7):
            core.sweep(limit=100, batch_max=1, hold_s=hold_s, now_s=later(minutes * 60))
        assert copies(db, CRM[1], event_id) == 1
        channel.qos.restore_visible(num=10, interval=1)
    assert db.hlen(UNACKED) == 0
    assert copies(db, CRM[1], event_id) == 2
    back: Any = db.lindex(CRM[1], -1)
    assert orjson.loads(back)["properties"]["delivery_info"]["redelivered"]

    outcomes: list[str] = []
    while db.llen(CRM[1]):
        kwargs = take(db, CRM[1])
        outcomes += start(core, CRM[0], kwargs["ids"], "w2", CRM[1], seq=kwargs["seq"])
        if outcomes[-1] == "run":
            assert finish(core, "w2", Ending(event_id, "done", "ok")) == "ok"
    assert sorted(outcomes) == ["done", "run"]
    assert audit(db) == []
    assert db.zcard(DUE) == 0


def test_after_redis_lost_its_last_writes_a_queue_nobody_consumes_gets_no_pile_of_copies(
    db: redis.Redis, core: PairStore
) -> None:
    """Redis restarts from an AOF that lost its last second (appendfsync everysec): calhook:seq
    of the queue goes back with it, while a worker still holds a message numbered past it
    (taken before the crash, started after the restart: redis-py retries the call). Its start
    raises calhook:taken above every number the queue will use for a while, so the sweep's
    FIFO test ("taken <= its number") takes every pending message for lost. A queue nobody
    consumes then gets one more copy of its pair every recovery interval, until the copies'
    numbers pass the rolled-back ones: here 30 messages for one pair in half an hour."""
    event_id = routed(core, [CRM])
    assert db.hget(SEQ, CRM[1]) == b"1"
    # a worker starts crm.30, pushed before the crash and rolled back with it
    assert start(core, CRM[0], [new_event_id()], "old", CRM[1], seq=30) == ["gone"]

    for n in range(1, 31):
        core.sweep(limit=100, batch_max=1, now_s=later(n * (RECOVER_S + 1)))

    assert copies(db, CRM[1], event_id) <= 2


def test_an_old_ack_of_a_reused_delivery_tag_does_not_lose_the_new_message(
    db: redis.Redis, url: str, core: PairStore
) -> None:
    """After that rollback a new message gets the tag of one a worker still holds. That worker
    acks its message, which deletes the new message's unacked entry while another worker holds
    it; that worker dies before starting it. The sweep still queues the pair once."""
    db.hset(SEQ, CRM[1], 6)  # seq rolled back to 6; a worker still holds crm.7
    event_id = routed(core, [CRM])
    with Connection(url) as conn:
        channel: Any = conn.default_channel
        channel.do_restore = False  # this worker is killed: nothing restored at its end
        held = channel.basic_get(CRM[1])
        assert held is not None
        assert held.delivery_tag == f"{CRM[1]}.7"
    with Connection(url) as conn:
        old: Any = conn.default_channel
        old.basic_ack(f"{CRM[1]}.7")  # the old worker's ack
    assert not db.hexists(UNACKED, f"{CRM[1]}.7")

    swept = core.sweep(limit=100, batch_max=1, now_s=later(RECOVER_S + 1))
    assert swept.lost == 1
    assert copies(db, CRM[1], event_id) == 1
    assert core.sweep(limit=100, batch_max=1, now_s=later(3 * RECOVER_S)).queued == 0


def test_a_scheduler_down_longer_than_the_lease_leaves_a_renewed_run_alone(
    db: redis.Redis, settings: Settings
) -> None:
    """The scheduler down for longer than the lease: its due entry is long past, but the lease
    was renewed all along."""
    timeline = Timeline()
    worker = process(db, settings, timeline)
    event_id = routed(worker, [CRM])
    db.delete(CRM[1])
    assert start(worker, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    for _ in range(30):  # ten minutes
        timeline.t += LEASE_S / 3
        assert worker.renew("w1", [due_member(event_id, CRM[0])]) == []

    assert sweep_once(process(db, settings, timeline), settings) == 0
    assert state(worker, event_id, CRM[0]) == "running"
    assert db.llen(CRM[1]) == 0
    assert db.zscore(DUE, due_member(event_id, CRM[0])) == pytest.approx(
        (timeline.t + LEASE_S) * 1000, abs=1
    )


def test_replay_and_forget_of_the_same_events_in_either_order_leave_nothing_behind(
    db: redis.Redis, core: PairStore
) -> None:
    """One operator replays dead letters while another forgets their events: either order."""
    events = []
    for _ in range(6):
        event_id = store.accept(core)
        store.dead_letter(core, event_id, *CRM)
        events.append(event_id)
    db.delete(CRM[1], DISPATCH_QUEUE)
    for n, event_id in enumerate(events):
        if n % 2:
            core.replay("dead", f"{event_id}.{CRM[0]}")
            assert core.forget([event_id]) == (1, 1, 0)
        else:
            assert core.forget([event_id]) == (1, 0, 1)
            with pytest.raises(ReplayError):
                core.replay("dead", f"{event_id}.{CRM[0]}")
        assert core.purge("dead", [f"{event_id}.{CRM[0]}"]) == 0

    while db.llen(CRM[1]):
        kwargs = take(db, CRM[1])
        assert start(core, CRM[0], kwargs["ids"], "w", CRM[1], seq=kwargs["seq"]) == ["gone"]
    left = [k for k in db.scan_iter("calhook:*") if any(e.encode() in k for e in events)]
    assert left == []
    members = [m for z in (DUE, DEAD, PARKED, "calhook:events") for m in db.zrange(z, 0, -1)]
    assert members == []
    assert audit(db) == []
    assert db.zcard(DUE) == db.zcard(DEAD) == 0


# --- a random walk through every transition ---------------------------------------------------

FUZZ_HANDLERS = (("h.a", "qa"), ("h.b", "qb"), ("h.o", "qo"))


@dataclass
class _Run:
    owner: str
    event_id: str
    pair: str


class _Walk:
    """A fleet doing everything at random: workers take messages and run them to every ending
    (or die, or hold them across steps with a beating heartbeat), messages get lost or copied,
    the scheduler sweeps, operators replay, purge (records that exist) and forget. After every
    step the store must pass :func:`audit`, no live run may be run twice, and no open pair may
    have more messages than the faults that touched it allow."""

    def __init__(self, db: redis.Redis, settings: Settings, seed: int) -> None:
        self.db = db
        self.rng = random.Random(seed)
        self.timeline = Timeline(1_800_000_000.0)
        self.store = process(db, settings, self.timeline)
        self.settings = settings
        self.live: list[_Run] = []
        self.done: set[tuple[str, str]] = set()
        self.allowance: Counter[tuple[str, str]] = Counter()
        self.events: list[str] = []
        self.owners = 0
        self.versions = 0

    def owner(self) -> str:
        self.owners += 1
        return f"w{self.owners}"

    def queues(self) -> list[str]:
        return [DISPATCH_QUEUE] + [q for _, q in FUZZ_HANDLERS]

    def accept(self) -> None:
        bodies = [b"{}"] * self.rng.randint(1, 3)
        self.events += accept_batch(self.store, bodies, "x")

    def take(self) -> None:
        queue = self.rng.choice([q for q in self.queues() if self.db.llen(q)] or [DISPATCH_QUEUE])
        raw: Any = self.db.rpop(queue)
        if raw is None:
            return
        task, _, kwargs, _ = read_task_message(raw)
        pair = DISPATCH_PAIR if task == DISPATCH_TASK else kwargs["handler"]
        owner = self.owner()
        started = self.store.start(
            pair, kwargs["ids"], owner, max_starts=5, seq=kwargs["seq"], queue=queue, defer_s=1.0
        )
        for s in started:
            if not s.run:
                continue
            live = [r for r in self.live if (r.event_id, r.pair) == (s.event_id, pair)]
            assert not live, f"{s.event_id}/{pair} started while {live[0].owner} runs it"
            assert (s.event_id, pair) not in self.done, f"{s.event_id}/{pair} ran after done"
            run = _Run(owner, s.event_id, pair)
            roll = self.rng.random()
            if roll < 0.08:  # the worker dies: kombu puts the message back, or not
                self.allowance[(s.event_id, pair)] += 2
                if self.rng.random() < 0.5:
                    self.db.lpush(queue, raw)
                    for event_id in kwargs["ids"]:
                        self.allowance[(event_id, pair)] += 1
            elif roll < 0.25:
                self.live.append(run)
            else:
                self.end(run)

    def end(self, run: _Run) -> None:
        if run in self.live:
            self.live.remove(run)
        if run.pair == DISPATCH_PAIR:
            received = orjson.dumps({"at": self.timeline.t, "what": "received"})
            if self.rng.random() < 0.15:
                route = Route(run.event_id, "x", received, park_reason="unknown_type")
            else:
                chosen = self.rng.sample(FUZZ_HANDLERS, self.rng.randint(1, 3))
                handlers = []
                for h, q in chosen:
                    entity, version = "", ""
                    if h == "h.o":
                        self.versions += 1
                        entity = f"s:e{self.rng.randint(0, 2)}"
                        version = (
                            f"{self.rng.randint(0, 50)}|{self.rng.randint(0, 2)}|{run.event_id}"
                        )
                    handlers.append((h, q, entity, version))
                route = Route(run.event_id, "x", received, handlers)
            self.store.fan_out(throughput_key(DISPATCH_QUEUE), 2, [route])
            return
        do = self.rng.choices(["done", "retry", "defer", "dead"], [5, 2, 2, 3])[0]
        delay = self.rng.uniform(0, 120)
        ending = Ending(run.event_id, do, do, delay_s=delay, reason="permanent", error="e")
        result = self.store.finish(run.pair, run.owner, "calhook:throughput:fuzz", [ending])[0]
        assert result == "ok" or (result == "late" and run.event_id not in self.events), result
        if do == "done":
            self.done.add((run.event_id, run.pair))

    def lose(self) -> None:
        queue = self.rng.choice(self.queues())
        self.db.rpop(queue)

    def copy(self) -> None:
        queue = self.rng.choice(self.queues())
        raw: Any = self.db.lindex(queue, self.rng.randint(0, max(self.db.llen(queue) - 1, 0)))
        if raw is None:
            return
        self.db.lpush(queue, raw)
        for event_id in read_task_message(raw)[2]["ids"]:
            task = read_task_message(raw)[0]
            pair = DISPATCH_PAIR if task == DISPATCH_TASK else read_task_message(raw)[2]["handler"]
            self.allowance[(event_id, pair)] += 1

    def tick(self) -> None:
        self.timeline.t += self.rng.uniform(0.5, LEASE_S / 3)
        for run in self.live:
            assert self.store.renew(run.owner, [due_member(run.event_id, run.pair)]) == []
        sweep_once(self.store, self.settings)

    def operator(self) -> None:
        dead: list[bytes] = self.db.zrange(DEAD, 0, -1)  # type: ignore[assignment]
        parked: list[bytes] = self.db.zrange(PARKED, 0, -1)  # type: ignore[assignment]
        records = [("dead", m.decode()) for m in dead] + [("parked", m.decode()) for m in parked]
        roll = self.rng.random()
        if roll < 0.15 and self.events:
            gone = self.rng.choice(self.events)
            self.store.forget([gone])
            self.events.remove(gone)
            self.live = [r for r in self.live if r.event_id != gone]
        elif records:
            kind, record_id = self.rng.choice(records)
            if roll < 0.7:
                self.store.replay(kind, record_id)
                event_id = record_id.split(".", 1)[0]
                pair = record_id.split(".", 1)[1] if kind == "dead" else DISPATCH_PAIR
                self.done.discard((event_id, pair))
            else:
                assert self.store.purge(kind, [record_id]) == 1

    def check(self) -> None:
        assert audit(self.db) == []
        named: Counter[tuple[str, str]] = Counter()
        pipe = self.db.pipeline(transaction=True)
        for queue in self.queues():
            pipe.lrange(queue, 0, -1)
        for raws in pipe.execute():
            for raw in raws:
                task, _, kwargs, _ = read_task_message(raw)
                pair = DISPATCH_PAIR if task == DISPATCH_TASK else kwargs["handler"]
                for event_id in kwargs["ids"]:
                    named[(event_id, pair)] += 1
        crowded = [key for key, n in named.items() if n > 1 + self.allowance[key]]
        for key in crowded:
            found: Any = self.db.hget(event_key(key[0]), f"{key[1]}/s")
            assert found is None or found.decode() not in OPEN_STATES, (
                f"{key}: {named[key]} messages"
            )

    def step(self) -> None:
        action = self.rng.choices(
            [
                self.accept,
                self.take,
                self.finish_live,
                self.lose,
                self.copy,
                self.tick,
                self.operator,
            ],
            [3, 8, 2, 1, 1, 4, 1],
        )[0]
        action()
        self.check()

    def finish_live(self) -> None:
        if self.live:
            self.end(self.rng.choice(self.live))

    def drain(self) -> None:
        """No more faults: run everything to a final state, replaying what ends dead or parked."""
        for n in range(2000):
            if any(self.db.llen(q) for q in self.queues()):
                self.take()
            elif self.live:
                self.end(self.live[0])
            elif self.db.zcard(DUE):
                self.timeline.t += LEASE_S + 1
                sweep_once(self.store, self.settings)
            else:
                break
            if n % 20 == 0:
                self.check()
        self.check()
        assert self.db.zcard(DUE) == 0
        assert not self.live


@pytest.mark.parametrize("seed", range(4))
def test_a_random_walk_through_every_transition_keeps_every_invariant(
    db: redis.Redis, settings: Settings, seed: int
) -> None:
    walk = _Walk(db, settings, seed)
    for _ in range(400):
        walk.step()
    walk.drain()

    for s in OPEN_STATES:
        assert all(int(v) == 0 for v in db.hvals(pairs_key(s))), s
    for event_id in walk.events:
        states = walk.store.states(event_id)
        assert all(p.final for p in states.values())
        keep = int(db.hget(event_key(event_id), "keep") or 0)
        assert bool(db.exists(body_key(event_id))) == (keep > 0)


# === second round ==============================================================================
#
# Attacks on the fixes of the first round: locks owned by a run, sticky deletes, the order rules,
# purge with a cutoff, the HOLD rule, Redis's clock, the legacy `add` path. Where a key's TTL
# matters (an entity's lock is a PX lease), time passes through :func:`age`, which runs every
# TTL in the database down by the same amount as the timeline, as real time would.

ENTITY = "crm:customer:c1"
LOCK = f"{order_key('crm', 'customer:c1')}:lock"


def age(db: redis.Redis, timeline: Timeline, s: float) -> None:
    """``s`` seconds pass: the timeline moves on, and every key's TTL runs down with it (a key
    whose TTL runs out is gone)."""
    timeline.t += s
    keys = list(db.scan_iter(count=1000))
    pipe = db.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    ttls = pipe.execute()
    pipe = db.pipeline(transaction=False)
    for key, ttl in zip(keys, ttls, strict=True):
        if ttl > s * 1000:
            pipe.pexpire(key, ttl - int(s * 1000))
        elif ttl >= 0:
            pipe.delete(key)
    pipe.execute()


def run_done(core: PairStore, event_id: str, owner: str, handler: tuple[str, str] = CRM) -> str:
    """Start the pair and, if it runs, end it done; what the start came to."""
    [what] = start(core, handler[0], [event_id], owner, handler[1])
    if what == "run":
        assert finish(core, owner, Ending(event_id, "done", "ok"), handler) == "ok"
    return what


# --- locks owned by a run ----------------------------------------------------------------------


def test_the_run_that_took_over_a_stalled_pair_keeps_its_entity_after_the_stalled_run_is_done(
    db: redis.Redis, settings: Settings
) -> None:
    """Worker A runs the older event of an entity and stalls past its lease (its lock runs out
    with it); the sweep queues the pair and worker B runs it, taking the entity's lock. A wakes
    up and reports `done` (accepted: the effect happened), which closes the pair and drops its
    order entity, while B is still applying the same older version with its heartbeat beating.
    B's heartbeat can no longer find the lock (renew looks it up through the pair's entity,
    gone; and it only renews running pairs), so the lock runs out a lease later and the newer
    event of the entity starts while B still applies the older one: B's older write can land
    after the newer one. Expected: as long as B's run is alive, the entity stays locked."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    older = routed(core, [CRM], ENTITY, "100|1|a")
    newer = routed(core, [CRM], ENTITY, "200|1|b")
    db.delete(CRM[1])
    assert start(core, CRM[0], [older], "A", CRM[1]) == ["run"]
    age(db, timeline, LEASE_S + 1)  # A stalls: no beat; its lease and its lock run out
    assert core.sweep(limit=100, batch_max=1).expired == 1
    assert start(core, CRM[0], [older], "B", CRM[1]) == ["run"]
    assert db.get(LOCK) == f"{older}/{CRM[0]}|B".encode()

    assert finish(core, "A", Ending(older, "done", "ok")) == "ok"  # A wakes up, done
    for _ in range(6):  # two more minutes of B's work, its heartbeat beating every 20 s
        age(db, timeline, LEASE_S / 3)
        core.renew("B", [due_member(older, CRM[0])])
        sweep_once(core, settings)

    assert start(core, CRM[0], [newer], "C", CRM[1]) == ["deferred"], "B still applies v100"


def test_a_heartbeat_that_renews_a_lapsed_lease_takes_the_entity_lock_back_too(
    db: redis.Redis, settings: Settings
) -> None:
    """A Redis failover (or a pause) keeps the heartbeat from beating for longer than the lease;
    the pair's lease and its entity's lock run out together. The heartbeat gets through before
    the scheduler's next sweep (it was cut off by the same failover, or is being redeployed):
    renew.lua finds the pair still running under this owner and extends its lease, but the lock
    is gone and renew only PEXPIREs a lock that exists. The run goes on with a live lease and
    no lock, and the newer event of the entity runs beside it. Expected: a renewed lease comes
    with the lock (taken again if it is free; else the pair is reported lost)."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    older = routed(core, [CRM], ENTITY, "100|1|a")
    newer = routed(core, [CRM], ENTITY, "200|1|b")
    db.delete(CRM[1])
    assert start(core, CRM[0], [older], "A", CRM[1]) == ["run"]
    age(db, timeline, LEASE_S + 5)  # no beat got through for a lease and 5 s

    lost = core.renew("A", [due_member(older, CRM[0])])

    pair = core.states(older)[CRM[0]]
    if not lost and pair.state == "running" and (pair.lease_until_s or 0) > timeline.t:
        assert db.get(LOCK) == f"{older}/{CRM[0]}|A".encode(), "a live lease without its lock"
        assert start(core, CRM[0], [newer], "C", CRM[1]) == ["deferred"]


def test_a_lock_taken_over_from_an_earlier_run_of_the_pair_is_the_new_runs_alone(
    db: redis.Redis, settings: Settings
) -> None:
    """The same-pair takeover at start: the earlier run's lock is still there when its lease is
    over (here the store's clock runs ahead of the lock's PX). B takes it over; A, still alive,
    cannot renew it, and its late `retry` (refused) or `defer` (refused) leaves it alone; B's
    done commits and frees the entity for the newer event."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    older = routed(core, [CRM], ENTITY, "100|1|a")
    newer = routed(core, [CRM], ENTITY, "200|1|b")
    db.delete(CRM[1])
    assert start(core, CRM[0], [older], "A", CRM[1]) == ["run"]
    timeline.t += LEASE_S + 1  # the lease is over by the store's clock; the lock is still there
    assert core.sweep(limit=100, batch_max=1).expired == 1
    # The sweep keeps the entity for the cut run until the pair runs again (its effect may have
    # happened without its done): no older event in between.
    assert db.get(LOCK) == f"{older}/{CRM[0]}|~cut".encode()
    assert start(core, CRM[0], [older], "B", CRM[1]) == ["run"]
    assert db.get(LOCK) == f"{older}/{CRM[0]}|B".encode()

    assert core.renew("A", [due_member(older, CRM[0])]) == [due_member(older, CRM[0])]
    for do in ("retry", "defer", "dead"):
        late = Ending(older, do, do, delay_s=1, reason="permanent", error="late")
        assert finish(core, "A", late) == "lost"
    assert db.get(LOCK) == f"{older}/{CRM[0]}|B".encode()
    assert start(core, CRM[0], [newer], "C", CRM[1]) == ["deferred"]
    assert finish(core, "B", Ending(older, "done", "ok")) == "ok"
    assert not db.exists(LOCK)
    core.sweep(limit=100, batch_max=1, now_s=timeline.t + 5)
    assert run_done(core, newer, "C") == "run"
    assert db.hget(order_key("crm", "customer:c1"), "event_id") == b"b"
    assert audit(db) == []


# --- the order rules ---------------------------------------------------------------------------


def test_the_second_handler_of_a_scope_applies_a_delete_the_first_applied_after_a_newer_update(
    db: redis.Redis, core: PairStore
) -> None:
    """Two ordered handlers share a scope (order_scope): the same event applies for each.
    customer.updated (created 300) is applied by the first; the customer.deleted (created 200)
    it overtook applies after it (the sticky-delete rule) and its commit turns the entity's
    version into (300, deleted, <the update's id>). The second handler then starts the delete:
    it is not the entity's event (that is the update's id), not newer, and the entity is already
    deleted, so it ends stale; the update is stale for it too (a different kind). The second
    handler never deletes the customer. Expected: the delete runs for the second handler (the
    sticky commit should record the delete's event, and the same event compare by kind)."""
    update = routed(core, [CRM, NOTIFY], ENTITY, "300|1|u")
    delete = routed(core, [CRM, NOTIFY], ENTITY, "200|2|d")
    assert run_done(core, update, "w1") == "run"
    assert run_done(core, delete, "w1") == "run"

    assert run_done(core, update, "w2", NOTIFY) == "stale"  # deleted: no update applies
    assert run_done(core, delete, "w2", NOTIFY) == "run", "the second handler never deletes it"


def test_a_held_up_delete_does_not_delete_an_entity_created_again_after_it(
    db: redis.Redis, core: PairStore
) -> None:
    """Sticky delete vs a create between it and the update it overtook: created (100), deleted
    (200), created again (250), updated (300). The delete is held up by a rate limit; the
    other three apply in order. The delete then applies after the newer update (the sticky
    rule) and the entity ends deleted, though in version order the create at 250 revived it and
    the update at 300 stands. Expected: the delete is stale once a newer create was applied
    (the entity's version would need to remember its last create)."""
    delete = routed(core, [CRM], ENTITY, "200|2|d")
    assert start(core, CRM[0], [delete], "w0", CRM[1]) == ["run"]
    assert finish(core, "w0", Ending(delete, "defer", "deferred", delay_s=1)) == "ok"
    for version in ("100|0|c", "250|0|r", "300|1|u"):
        assert run_done(core, routed(core, [CRM], ENTITY, version), "w1") == "run"

    core.sweep(limit=100, batch_max=1, now_s=later(5))
    assert run_done(core, delete, "w2") == "stale", "a re-created entity deleted again"


@pytest.mark.parametrize(
    ("applied", "candidate", "expected"),
    [
        ("100|1|a", "100|1|b", "run"),  # two updates in one second: the later event applies
        ("100|1|b", "100|1|a", "stale"),  # ... the earlier one does not
        ("100|0|a", "100|1|b", "run"),  # an update stamped with its create's second
        ("100|1|b", "100|0|a", "stale"),  # a create after an update of the same second
        ("100|1|a", "100|2|b", "run"),  # a delete stamped with the update's second
        ("100|2|a", "100|2|b", "stale"),  # a second delete of the same second
        ("100|2|b", "100|2|a", "stale"),
        ("100|2|a", "100|1|b", "stale"),  # an update after a delete of the same second
        ("100|2|a", "100|0|b", "stale"),  # a create of the same second as a delete
        ("100|2|a", "101|0|b", "run"),  # a newer create revives it
        ("100|2|a", "101|1|b", "stale"),  # a newer update does not
        ("200|1|a", "100|2|b", "run"),  # a delete that was held up applies after an update
        ("200|0|a", "100|2|b", "stale"),  # ... not after a newer create
        ("200|2|a", "100|2|b", "stale"),  # ... nor after a newer delete
        ("200|1|a", "100|1|b", "stale"),  # an older update never
    ],
)
def test_two_versions_of_one_entity_from_different_events_apply_in_version_order(
    db: redis.Redis, core: PairStore, applied: str, candidate: str, expected: str
) -> None:
    """`applies` for two different events: same second, same or different kinds."""
    assert run_done(core, routed(core, [CRM], ENTITY, applied), "w1") == "run"
    assert run_done(core, routed(core, [CRM], ENTITY, candidate), "w2") == expected


def test_after_a_sticky_delete_only_a_newer_create_applies_not_one_of_the_same_second(
    db: redis.Redis, core: PairStore
) -> None:
    """After a held-up delete applied over a newer update (the entity's version is the update's
    second, kind deleted), events stamped with that second do not revive it: an update or a
    second delete is stale; a create of the next second applies and the entity lives again."""
    assert run_done(core, routed(core, [CRM], ENTITY, "300|1|u"), "w1") == "run"
    assert run_done(core, routed(core, [CRM], ENTITY, "200|2|d"), "w1") == "run"
    for version in ("300|1|v", "300|2|w", "250|1|x", "299|0|y"):
        assert run_done(core, routed(core, [CRM], ENTITY, version), "w2") == "stale", version
    assert run_done(core, routed(core, [CRM], ENTITY, "301|0|c"), "w3") == "run"
    assert run_done(core, routed(core, [CRM], ENTITY, "302|1|n"), "w3") == "run"
    assert db.hget(order_key("crm", "customer:c1"), "kind") == b"1"
    assert audit(db) == []


@pytest.mark.parametrize("dead_kind", ["1", "2"])
def test_a_dead_letter_replayed_after_its_entity_was_deleted_and_created_again_is_stale(
    db: redis.Redis, core: PairStore, dead_kind: str
) -> None:
    """An update (or a delete) of an entity ends dead; the entity is then deleted and created
    again (newer events, applied). The replayed dead letter keeps its order version and ends
    stale: it neither overwrites nor deletes the new entity."""
    old = routed(core, [CRM], ENTITY, f"100|{dead_kind}|a")
    assert start(core, CRM[0], [old], "w1", CRM[1]) == ["run"]
    dead = Ending(old, "dead", "dead_permanent", reason="permanent", error="400")
    assert finish(core, "w1", dead) == "ok"
    assert run_done(core, routed(core, [CRM], ENTITY, "200|2|d"), "w2") == "run"
    assert run_done(core, routed(core, [CRM], ENTITY, "300|0|c"), "w2") == "run"

    assert core.replay("dead", f"{old}.{CRM[0]}") == CRM[1]
    assert run_done(core, old, "w3") == "stale"
    assert db.hget(order_key("crm", "customer:c1"), "event_id") == b"c"
    assert audit(db) == []
    assert not db.exists(body_key(old))


# --- records: purge with a cutoff --------------------------------------------------------------


def test_retention_racing_a_replay_that_is_done_then_dead_again_keeps_the_body_count_right(
    db: redis.Redis, settings: Settings
) -> None:
    """Retention reads two old dead letters of one event; before it purges them, an operator
    replays one, which is done, and the other's pair... stays dead. The purge finds one record
    still indexed and old (purged, keep 0: the body goes) and skips the replayed one. Then the
    replayed pair ends dead again by a second replay: a fresh record, which keeps the body it
    needs, and the later retention leaves it alone."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    event_id, crm_record, notify_record = two_dead_letters(core)
    timeline.t += settings.retention_s + 10
    purge = core.purge

    def operator_acts_first(
        kind: str, record_ids: Sequence[str], stored_before: float | None = None
    ) -> int:
        core.purge = purge  # type: ignore[method-assign]
        assert core.replay("dead", crm_record) == CRM[1]
        purged.append(purge(kind, record_ids, stored_before))
        return purged[-1]

    purged: list[int] = []
    core.purge = operator_acts_first  # type: ignore[method-assign]
    sweep_retention(core, settings, now_s=timeline.t)
    assert purged == [1]
    assert db.exists(body_key(event_id)), "the replayed pair still needs the body"
    dead = Ending(event_id, "dead", "dead_permanent", reason="permanent", error="again")
    assert store.end(core, CRM[0], CRM[1], dead) == "ok"
    assert db.exists(body_key(event_id))
    sweep_retention(core, settings, now_s=timeline.t)
    assert RecordStore(db, DEAD_KIND).get(crm_record) is not None
    assert core.replay("dead", crm_record) == CRM[1]
    assert store.end(core, CRM[0], CRM[1], Ending(event_id, "done", "ok")) == "ok"
    assert not db.exists(body_key(event_id))
    assert RecordStore(db, DEAD_KIND).get(notify_record) is None
    assert audit(db) == []


# --- the upgrade from calhook 0.1: the `add` path ----------------------------------------------


def legacy_kwargs(event_id: str, customer: str = "") -> dict[str, Any]:
    """A handler message of calhook 0.1: it carries the event itself."""
    body = orjson.dumps({"type": "customer.updated", "customer": {"uuid": customer}}).decode()
    return {"event_id": event_id, "body": body, "endpoint": "default", "received_at": 1.0}


def run_queue(core: PairStore, db: redis.Redis, queue: str, owner: str) -> list[str]:
    """Take every message of ``queue`` and end each pair it runs done; what each start was."""
    outcomes: list[str] = []
    while db.llen(queue):
        kwargs = take(db, queue)
        for event_id in kwargs["ids"]:
            [what] = start(core, kwargs["handler"], [event_id], owner, queue, seq=kwargs["seq"])
            outcomes.append(what)
            if what == "run":
                ending = Ending(event_id, "done", "ok")
                assert core.finish(kwargs["handler"], owner, "calhook:tput", [ending]) == ["ok"]
    return outcomes


def test_a_second_copy_of_a_legacy_message_after_its_event_settled_leaves_no_body_for_ever(
    db: redis.Redis, core: PairStore
) -> None:
    """A 0.1 handler message is taken over, and its pair is done: the event settles (body
    deleted, states expire with the ledger TTL). A second copy of the same 0.1 message (0.1's
    watchdog queued copies; a redelivery) is taken over: the dispatch is done, so it goes the
    `add` way, which stores the body again and PERSISTs the event and the body before finding
    that the pair exists already. Nothing is opened, so nothing will ever delete them: a
    customer's data kept for ever, past the retention. Expected: a copy that adds no pair
    writes nothing (the event and the body stay as settled)."""
    kwargs = legacy_kwargs("old-settled")
    legacy.take_over(core, kwargs, CRM[0], CRM[1])
    assert run_queue(core, db, CRM[1], "w1") == ["run"]
    assert not db.exists(body_key("old-settled"))
    assert db.ttl(event_key("old-settled")) > 0

    legacy.take_over(core, kwargs, CRM[0], CRM[1])

    assert run_queue(core, db, CRM[1], "w2") == []
    assert not db.exists(body_key("old-settled")), "a body nothing needs, without a TTL"
    assert db.ttl(event_key("old-settled")) > 0, "the event's states never expire"
    assert audit(db) == []


def test_a_legacy_message_for_another_handler_after_the_event_settled_runs_and_settles_again(
    db: redis.Redis, core: PairStore
) -> None:
    """The `add` path on a settled event: the second handler's 0.1 message adds its pair, with
    the body it carries; once that pair is done the event settles again (body gone, TTL back)."""
    kwargs = legacy_kwargs("old-other")
    legacy.take_over(core, kwargs, CRM[0], CRM[1])
    assert run_queue(core, db, CRM[1], "w1") == ["run"]

    legacy.take_over(core, kwargs, NOTIFY[0], NOTIFY[1])
    assert state(core, "old-other", NOTIFY[0]) == "queued"
    assert db.get(body_key("old-other")) == kwargs["body"].encode()
    assert run_queue(core, db, NOTIFY[1], "w2") == ["run"]

    assert not db.exists(body_key("old-other"))
    assert db.ttl(event_key("old-other")) > 0
    assert state(core, "old-other", CRM[0]) == state(core, "old-other", NOTIFY[0]) == "done"
    assert audit(db) == []


def test_a_legacy_message_after_the_events_states_expired_is_not_lost(
    db: redis.Redis, make_settings: Callable[..., Settings]
) -> None:
    """With CALHOOK_LEDGER_TTL_S at its allowed minimum (a day) the states of a settled event
    expire before the take-over's dedup key (48 h). A 0.1 message of the event for another
    handler arriving in between (an upgrade with a backlog) is deduplicated by accept (our own
    id: nothing is written), finds no dispatch to start, and its `add` comes back 'late':
    that handler's work is dropped without a trace. Expected: its pair is queued (the dedup
    key of a take-over should not outlive the states, or the `add` should store the event)."""
    settings = make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S, ledger_ttl_s=86_400)
    timeline = Timeline()
    core = process(db, settings, timeline)
    kwargs = legacy_kwargs("old-expired")
    legacy.take_over(core, kwargs, CRM[0], CRM[1])
    assert run_queue(core, db, CRM[1], "w1") == ["run"]
    age(db, timeline, 86_400 + 60)
    assert not db.exists(event_key("old-expired"))

    legacy.take_over(core, kwargs, NOTIFY[0], NOTIFY[1])

    assert state(core, "old-expired", NOTIFY[0]) == "queued", "the handler's work was dropped"
    assert copies(db, NOTIFY[1], "old-expired") == 1


def test_a_forgotten_customer_is_not_stored_again_by_a_legacy_message_still_queued(
    db: redis.Redis, core: PairStore
) -> None:
    """Right to erasure during the upgrade: a customer's event came from calhook 0.1 as one
    message per handler. The first is taken over (the event is stored, its pair queued); the
    operator runs `calhook forget <customer>`, which erases the event with its open work and
    its dedup keys (also the take-over's `legacy:<id>`). The event's second 0.1 message, still
    queued, carries the body: taken over, it finds no dedup key and stores the customer's event
    again, and the handler sends the customer's data on. Expected: a forgotten event is not
    stored again by a message that still names it (e.g. forget keeps the take-over's dedup key,
    which holds only the event id, or leaves a tombstone)."""
    customer = "5a3c1f0e-0000-4000-8000-00000000c0de"
    kwargs = legacy_kwargs("old-forgotten", customer)
    legacy.take_over(core, kwargs, CRM[0], CRM[1])
    assert state(core, "old-forgotten", CRM[0]) == "queued"
    report = forget_customer(core, customer)
    assert "old-forgotten" in report.event_ids

    legacy.take_over(core, kwargs, NOTIFY[0], NOTIFY[1])

    assert run_queue(core, db, CRM[1], "w1") == ["gone"]
    assert not db.exists(event_key("old-forgotten"), body_key("old-forgotten")), "stored again"
    assert run_queue(core, db, NOTIFY[1], "w1") in ([], ["gone"])


@pytest.mark.parametrize("when", ["before start", "before fan_out"])
def test_forget_inside_a_legacy_take_over_stores_nothing(
    db: redis.Redis, core: PairStore, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Forget of the event between the steps of a take-over (accept, start of the dispatch,
    fan_out, or the `add` of a second handler): nothing is stored, nothing queued."""
    first = legacy_kwargs("old-race")
    legacy.take_over(core, first, CRM[0], CRM[1])
    method = "start" if when == "before start" else "fan_out"
    real = getattr(core, method)

    def forget_first(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(core, method, real)
        core.forget(["old-race"])
        return real(*args, **kwargs)

    monkeypatch.setattr(core, method, forget_first)
    legacy.take_over(core, first, NOTIFY[0], NOTIFY[1])

    assert not db.exists(event_key("old-race"), body_key("old-race"))
    assert run_queue(core, db, CRM[1], "w1") == ["gone"]
    assert db.llen(NOTIFY[1]) == 0
    assert db.zcard(DUE) == 0
    assert audit(db) == []


# --- the HOLD rule, Redis's clock ---------------------------------------------------------------


def test_messages_a_live_worker_prefetched_behind_long_tasks_get_at_most_one_no_op_copy(
    db: redis.Redis, url: str, settings: Settings
) -> None:
    """A live worker holds three messages (kombu's unacked) and runs them one after another,
    each for nearly the task time limit, its heartbeat beating, the scheduler sweeping every
    10 s. The second starts before HOLD (time limit + recovery) is over: no copy. The third
    waits longer: the sweep queues one copy, no more however long it still waits; the worker
    then runs the original, and the copy, taken by another worker, runs nothing."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    events = [routed(core, [CRM]) for _ in range(3)]
    runs: Counter[str] = Counter()
    work_s = settings.task_time_limit_s - 10
    with Connection(url) as conn:
        channel: Any = conn.default_channel
        held = [channel.basic_get(CRM[1]) for _ in events]
        assert all(m is not None for m in held)
        assert db.llen(CRM[1]) == 0
        for message in held:
            kwargs = message.decode()[1]
            [event_id] = kwargs["ids"]
            assert start(core, CRM[0], [event_id], "W", CRM[1], seq=kwargs["seq"]) == ["run"]
            runs[event_id] += 1
            for _ in range(int(work_s // 10)):
                timeline.t += 10
                assert core.renew("W", [due_member(event_id, CRM[0])]) == []
                sweep_once(core, settings)
            assert finish(core, "W", Ending(event_id, "done", "ok")) == "ok"
            message.ack()

    assert [copies(db, CRM[1], e) for e in events] == [0, 0, 1]
    assert run_queue(core, db, CRM[1], "other") == ["done"]
    assert runs == dict.fromkeys(events, 1)
    assert audit(db) == []
    assert db.zcard(DUE) == 0


def test_a_store_script_queued_inside_a_transaction_still_reads_redis_clock(
    db: redis.Redis, settings: Settings
) -> None:
    """Redis's TIME inside a script run from MULTI/EXEC (a redis-py Script on a transaction
    pipeline): nothing in calhook does this today (every script is one call on a client), but
    Redis accepts it and the lease is set from Redis's own clock."""
    core = pair_store(db, settings)
    event_id = routed(core, [CRM])
    assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    renew = db.register_script(source("renew"))
    secs, micros = db.time()
    with db.pipeline(transaction=True) as pipe:
        renew(
            keys=[], args=[*clock(settings).head(), "w1", due_member(event_id, CRM[0])], client=pipe
        )
        pipe.hget(event_key(event_id), f"{CRM[0]}/l")
        lost, lease = pipe.execute()
    assert lost == []
    assert int(lease) / 1000 == pytest.approx(secs + micros / 1e6 + LEASE_S, abs=5)


# --- a random walk whose keys age with its timeline ---------------------------------------------


class _AgedWalk(_Walk):
    """The walk, with every TTL in Redis running down with the timeline (an entity's lock is a
    PX lease), and one invariant more: no two runs holding live leases apply one entity."""

    def tick(self) -> None:
        age(self.db, self.timeline, self.rng.uniform(0.5, LEASE_S / 3))
        for run in self.live:
            assert self.store.renew(run.owner, [due_member(run.event_id, run.pair)]) == []
        sweep_once(self.store, self.settings)

    def check(self) -> None:
        super().check()
        entities: Counter[str] = Counter()
        for run in self.live:
            found: Any = self.db.hget(event_key(run.event_id), f"{run.pair}/e")
            if found is not None:
                entities[found.decode()] += 1
                lock: Any = self.db.get(f"{order_key(*found.decode().split(':', 1))}:lock")
                assert lock == f"{run.event_id}/{run.pair}|{run.owner}".encode(), (run, lock)
        assert all(n == 1 for n in entities.values()), entities


@pytest.mark.parametrize("seed", range(4))
def test_a_random_walk_whose_locks_run_out_with_time_keeps_each_entity_to_one_run(
    db: redis.Redis, settings: Settings, seed: int
) -> None:
    walk = _AgedWalk(db, settings, seed)
    for _ in range(400):
        walk.step()
    walk.drain()
    for event_id in walk.events:
        assert all(p.final for p in walk.store.states(event_id).values())


def test_a_legacy_copy_after_its_dedup_key_expired_does_not_reset_an_event_still_open(
    db: redis.Redis, settings: Settings
) -> None:
    """An event of calhook 0.1 with two handlers: both messages are taken over; the first pair
    is done, the second waits in a backlog (its workers are down for two days). A copy of the
    first 0.1 message comes after the take-over's dedup key (48 h) expired, while the event's
    states are still there (open): accept.lua stores the event again over its hash: `open`
    back to 1 and the dispatch queued. That dispatch routes the (done) first handler only and
    closes, `open` drops to 0 and the event settles: the body is deleted while the second pair
    still needs it, whose start then hands the handler an empty body. Expected: an
    event whose states exist is not stored again; the second pair keeps its body."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    kwargs = legacy_kwargs("old-open")
    legacy.take_over(core, kwargs, CRM[0], CRM[1])
    legacy.take_over(core, kwargs, NOTIFY[0], NOTIFY[1])
    assert run_queue(core, db, CRM[1], "w1") == ["run"]
    age(db, timeline, 2 * 86_400 + 60)
    assert state(core, "old-open", NOTIFY[0]) == "queued"

    legacy.take_over(core, kwargs, CRM[0], CRM[1])
    run_queue(core, db, CRM[1], "w2")

    assert db.get(body_key("old-open")) == kwargs["body"].encode(), "the body went"
    assert db.hget(event_key("old-open"), "open") == b"1"
    assert audit(db) == []


def test_a_run_cut_after_its_effect_keeps_its_entity_until_it_runs_again(
    db: redis.Redis, settings: Settings
) -> None:
    """The soak's break: v1006's run applied its effect, then was cut (a Redis restart made
    Celery cancel it) before its done; its lock ran out with its lease, v1004 took the entity
    and applied, then v1006 ran again: 1006, 1004, 1006. The sweep now keeps the entity for the
    cut pair until it runs again, so the older event waits and ends stale."""
    timeline = Timeline()
    core = process(db, settings, timeline)
    newer = routed(core, [CRM], ENTITY, "1006|1|b")
    older = routed(core, [CRM], ENTITY, "1004|1|a")
    db.delete(CRM[1])
    assert start(core, CRM[0], [newer], "A", CRM[1]) == ["run"]  # applies, then is cut
    db.delete(LOCK)  # its lock ran out with its lease (the store's clock is ahead of PX here)
    timeline.t += LEASE_S + 1
    assert core.sweep(limit=100, batch_max=1).expired == 1

    assert start(core, CRM[0], [older], "C", CRM[1]) == ["deferred"]
    assert start(core, CRM[0], [newer], "B", CRM[1]) == ["run"]
    assert finish(core, "B", Ending(newer, "done", "ok")) == "ok"
    timeline.t += 5
    core.sweep(limit=100, batch_max=1)
    assert start(core, CRM[0], [older], "C", CRM[1]) == ["stale"]
    assert not db.exists(LOCK)
