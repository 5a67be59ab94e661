"""Attacks on holding, the circuit breaker and failure groups (calhook/store/health.py and the
Lua it drives: hold.lua, release.lua, start.lua, finish.lua, sweep.lua, replay.lua, forget.lua).

Each test plays workers, schedulers and operators step by step against a real Redis through the
real scripts, on a shared :class:`Timeline` (tests/support/core_rig.py), so "a lease later" is a
number. The tests under "breaks" each found a break, fixed since (its comment says what broke);
the others are attacks that held. Database 14 (tests/workers/conftest.py): no worker reads it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
import redis

from calhook.settings import Settings
from calhook.store.health import Breaker, Health, Released
from calhook.store.keys import (
    HELD_STATE,
    HOLD,
    NOTICES,
    QUEUED,
    RUNNING,
    body_key,
    order_key,
)
from calhook.store.pairs import Ending, PairStore
from calhook.store.queues import throughput_key
from calhook.store.records import DEAD as DEAD_KIND
from calhook.store.records import RecordStore
from tests.support import core_rig, store
from tests.support.core_rig import LEASE_S, Timeline, copies, process, routed, start, take

H, Q = "crm.sync", "crm"
A, B = "crm.a", "crm.b"
OWNER = "w1:1:run"
OTHER = "w2:1:run"
PROBE_S = 30.0


def brk(
    circuit: str = H, handlers: tuple[str, ...] = (H,), n: int = 3, w_s: float = 60.0
) -> dict[str, Any]:
    return {
        "c": circuit,
        "h": list(handlers),
        "n": n,
        "w": int(w_s * 1000),
        "p": int(PROBE_S * 1000),
        "m": int(4 * PROBE_S * 1000),
    }


ERROR = "CrmUnavailable: HubSpot answered 503"


def fail(
    event_id: str, b: dict[str, Any] | None, *, exhausted: bool = False, delay_s: float = 0.0
) -> Ending:
    if exhausted:
        return Ending(
            event_id, "dead", "dead_exhausted", reason="exhausted", error=ERROR, gist=ERROR,
            breaker=b,
        )  # fmt: skip
    return Ending(
        event_id, "retry", "retry_scheduled", delay_s=delay_s, error=ERROR, gist=ERROR, breaker=b
    )


def ok(event_id: str) -> Ending:
    return Ending(event_id, "done", "ok")


def text(value: object) -> str:
    """A reply of the client (bytes: it does not decode), decoded."""
    assert isinstance(value, bytes), value
    return value.decode()


class Ops:
    """A worker, a scheduler and an operator on one timeline (skews may differ per copy)."""

    def __init__(self, db: redis.Redis, settings: Settings, tl: Timeline, skew_s: float = 0.0):
        self.db, self.tl = db, tl
        self.pairs: PairStore = process(db, settings, tl, skew_s)
        self.health = Health(self.pairs.scripts)
        self.n = 0

    # --- events -----------------------------------------------------------------------------
    def event(
        self,
        handlers: list[tuple[str, str]] | None = None,
        *,
        ago_s: float,
        entity: str = "",
        created: int | None = None,
    ) -> str:
        self.n += 1
        body = f'{{"n": {self.n}}}'.encode()
        event_id = store.accept(self.pairs, body, received_at=self.tl.t - ago_s)
        version = f"{created}|1|{event_id}" if entity else ""
        routed(self.pairs, handlers or [(H, Q)], entity, version, event_id)
        return event_id

    # --- a worker ---------------------------------------------------------------------------
    def start(self, event_ids: list[str], pair: str = H, owner: str = OWNER) -> list[str]:
        return start(self.pairs, pair, event_ids, owner, Q)

    def finish(self, ending: Ending, pair: str = H, owner: str = OWNER) -> str:
        return self.pairs.finish(pair, owner, throughput_key(Q), [ending])[0]

    def run(self, ending: Ending, pair: str = H, owner: str = OWNER) -> list[str]:
        got = self.start([ending.event_id], pair, owner)
        if got == ["run"]:
            got.append(self.finish(ending, pair, owner))
        return got

    # --- the scheduler ----------------------------------------------------------------------
    def sweep(self) -> None:
        while self.pairs.sweep(limit=1000, batch_max=10, hold_s=0).looked_at >= 1000:
            pass

    def release(self, rate: float = 100.0, most: int = 1000) -> Released:
        return self.health.release(rate_per_s=rate, most=most, batch_max=10)

    def tick(self, s: float) -> None:
        self.tl.t += s

    # --- reading ----------------------------------------------------------------------------
    def state(self, event_id: str, pair: str = H) -> str:
        got = self.pairs.states(event_id).get(pair)
        return got.state if got else ""

    def hold_of(self, handler: str) -> str | None:
        raw = self.db.hget(HOLD, handler)
        return text(raw) if raw else None

    def breaker(self, circuit: str = H) -> Breaker:
        """The circuit's breaker, which must be there."""
        breaker = self.health.breaker(circuit)
        assert breaker is not None
        return breaker

    def notices(self) -> list[tuple[str, str]]:
        entries = self.db.xrange(NOTICES)
        assert entries is not None
        got = []
        for _, f in entries:
            assert f is not None
            got.append((text(f[b"kind"]), text(f[b"subject"])))
        return got

    def audit(self) -> list[str]:
        """The store's invariants at rest (tests/support/core_rig.py), held pairs included."""
        return core_rig.audit(self.db)


@pytest.fixture
def ops(db: redis.Redis, settings: Settings, timeline: Timeline) -> Ops:
    return Ops(db, settings, timeline)


def open_breaker(
    ops: Ops, n: int = 3, *, b: dict[str, Any] | None = None, pair: str = H
) -> list[str]:
    """n events of ``pair`` fail transiently (due at once) and open its breaker."""
    ids = [ops.event([(pair, Q)], ago_s=500 - i) for i in range(n)]
    for event_id in ids:
        assert ops.run(fail(event_id, b or brk()), pair) == ["run", "ok"]
    return ids


def probe_of(released: Released) -> str:
    ((_, member),) = released.probes
    return member.split("/")[0]


# --- breaks ----------------------------------------------------------------------------------


# Found by review, fixed: a release pace below 1 event/s never releases anything: the quota is
# capped at a second's worth, floor(rate) = 0, and calhook:released is never set, so held pairs
# stay held forever
def test_a_pace_below_one_a_second_still_releases(ops: Ops) -> None:
    ids = [ops.event(ago_s=100 - i) for i in range(3)]
    ops.health.pause(H)
    assert ops.start(ids) == ["held"] * 3
    ops.db.delete(Q)
    assert ops.health.resume(H, rate_per_s=0.5) == 3
    for _ in range(10):
        ops.release()
        ops.tick(1.0)
    # 10 s at 0.5/s: every one of the three is queued by now.
    assert [ops.state(e) for e in ids] == [QUEUED] * 3


# Found by review, fixed: a shared circuit's probe that succeeds does not close the breaker when
# its handler never failed itself (finish.lua closes only via calhook:recovering[handler], which
# only a failure of that handler sets): the breaker stays open, the other handler stays held
def test_a_shared_circuits_probe_success_closes_it_whichever_handler_it_was(ops: Ops) -> None:
    shared = brk("hubspot", (A, B))
    # b's events are older: the probe will be one of them.
    older_b = [ops.event([(B, Q)], ago_s=900 - i) for i in range(2)]
    open_breaker(ops, b=shared, pair=A)
    assert ops.breaker("hubspot").state == "open"
    assert ops.start(older_b, B) == ["held", "held"]
    ops.tick(PROBE_S + 1)
    probe = probe_of(ops.release())
    assert probe == older_b[0]
    assert ops.run(ok(probe), B) == ["run", "ok"]
    # The first success closes it: both handlers are free again.
    assert ops.health.breaker("hubspot") is None
    assert (ops.hold_of(A), ops.hold_of(B)) == (None, None)


# Found by review, fixed: a success of another handler of a shared circuit does not end the
# circuit's run of failures (only calhook:recovering[handler] of a handler that failed resets it):
# failures with a success of the circuit between them open its breaker
def test_a_success_of_another_handler_of_the_circuit_ends_the_run(ops: Ops) -> None:
    shared = brk("hubspot", (A, B))
    a = [ops.event([(A, Q)], ago_s=100 - i) for i in range(3)]
    (b,) = [ops.event([(B, Q)], ago_s=50)]
    assert ops.run(fail(a[0], shared), A) == ["run", "ok"]
    assert ops.run(fail(a[1], shared), A) == ["run", "ok"]
    assert ops.run(ok(b), B) == ["run", "ok"]  # hubspot answered
    assert ops.run(fail(a[2], shared), A) == ["run", "ok"]
    breaker = ops.health.breaker("hubspot")
    assert breaker is None or breaker.state == "closed"


# Found by review, fixed: an operator's resume of a handler of a shared circuit whose breaker is
# open (the handler was operator-paused when it opened, and never failed itself) leaves the
# breaker open but the handler unheld: its pairs run against the open circuit and an exhausted one
# is dead-lettered
def test_resume_of_one_handler_of_an_open_shared_circuit_keeps_it_safe(ops: Ops) -> None:
    shared = brk("hubspot", (A, B))
    a1 = ops.event([(A, Q)], ago_s=50)
    ops.health.pause(A, reason="deploying")
    open_breaker(ops, b=shared, pair=B)
    assert ops.breaker("hubspot").state == "open"
    assert ops.start([a1], A) == ["held"]
    ops.health.resume(A)
    ops.release()
    # Either the resume closed the circuit's breaker (as it does for a one-handler circuit),
    # or A is held by it still: never A running while its circuit's breaker is open.
    breaker = ops.health.breaker("hubspot")
    assert breaker is None or ops.hold_of(A) == "breaker:hubspot"
    if breaker is not None:
        # Still open: A's last attempt failing against it waits with the others.
        if ops.start([a1], A) == ["run"]:
            ops.finish(fail(a1, shared, exhausted=True), A)
        assert RecordStore(ops.db, DEAD_KIND).count() == 0


# Found by review, fixed: the probe livelocks on a cut run's entity lock: the oldest held pair is
# always the probe, it finds its entity locked for a held pair's cut run (deferred), is held again
# by the sweep and chosen again at once, so the lock holder never runs and the breaker never
# closes
def test_a_probe_blocked_by_a_cut_runs_entity_lock_does_not_livelock(ops: Ops) -> None:
    entity = "crm:cust-1"
    # e2 came in first (an older version), failed once and waits for its retry; then e1 (newer)
    # started and its worker died mid-run, holding the entity.
    e2 = ops.event(ago_s=300, entity=entity, created=100)
    e1 = ops.event(ago_s=200, entity=entity, created=200)
    others = [ops.event(ago_s=100 - i, entity=f"crm:cust-{i + 2}", created=300) for i in range(2)]
    assert ops.run(fail(e2, brk(), delay_s=5)) == ["run", "ok"]
    assert ops.start([e1], owner=OTHER) == ["run"]
    for event_id in others:
        assert ops.run(fail(event_id, brk(), delay_s=5)) == ["run", "ok"]
    assert ops.breaker(H).state == "open"
    ops.tick(LEASE_S + 1)
    ops.sweep()  # e1's run was cut: held, its entity kept for it; the others held when due
    assert {ops.state(e) for e in (e1, e2, *others)} == {HELD_STATE}
    outcomes = []
    for _ in range(6):
        ops.tick(4 * PROBE_S + 1)
        ops.sweep()
        released = ops.release()
        if not released.probes:
            continue
        probe = probe_of(released)
        got = ops.start([probe])
        outcomes.append((probe, got[0]))
        if got == ["run"]:
            ops.finish(ok(probe))
            break
    assert ops.health.breaker(H) is None, outcomes


# Found by review, fixed: a pair held, then done by its late (cut) run, stays in held:<handler>:
# holds() and resume report it as a held event still to release
def test_a_held_pair_done_by_its_late_run_leaves_no_held_entry(ops: Ops) -> None:
    (event_id,) = [ops.event(ago_s=10)]
    assert ops.start([event_id], owner=OTHER) == ["run"]
    ops.health.pause(H)
    ops.tick(LEASE_S + 1)
    ops.sweep()
    assert ops.state(event_id) == HELD_STATE
    # The cut run was only slow: its done counts (the effect happened).
    assert ops.finish(ok(event_id), owner=OTHER) == "ok"
    assert ops.state(event_id) == "done"
    assert ops.audit() == []
    assert [h.held for h in ops.health.holds()] == [0]
    assert ops.health.resume(H) == 0


# Found by review, fixed: the breaker's window is anchored on the first failure of the run: three
# transient failures within 3 s (no success between) do not open it when the run began more than a
# window earlier
def test_n_failures_within_the_window_open_the_breaker(ops: Ops) -> None:
    ids = [ops.event(ago_s=500 - i) for i in range(4)]
    b = brk(n=3, w_s=60.0)
    assert ops.run(fail(ids[0], b)) == ["run", "ok"]
    ops.tick(59)
    assert ops.run(fail(ids[1], b)) == ["run", "ok"]
    ops.tick(2)
    assert ops.run(fail(ids[2], b)) == ["run", "ok"]
    ops.tick(1)
    assert ops.run(fail(ids[3], b)) == ["run", "ok"]
    # ids[1..3]: three failures in 3 s.
    assert ops.breaker(H).state == "open"


# Found by review, fixed: a resume without a rate keeps the rate an earlier resume chose
# (calhook:release_rate is only cleared once every held event is released), not the default pace
def test_a_resume_without_a_rate_uses_the_default_pace(ops: Ops) -> None:
    ids = [ops.event(ago_s=100 - i) for i in range(30)]
    ops.health.pause(H)
    ops.start(ids)
    ops.db.delete(Q)
    ops.health.resume(H, rate_per_s=1)
    assert ops.release(rate=10).released == ((H, 1, 29),)
    ops.health.pause(H)
    ops.health.resume(H)
    ops.tick(5)
    # The default pace is 10/s now: a second's worth is 10.
    assert ops.release(rate=10).released == ((H, 10, 19),)


# --- attacks that held ------------------------------------------------------------------------


def test_two_copies_of_a_message_for_a_held_pair_run_it_once(ops: Ops) -> None:
    (event_id,) = [ops.event(ago_s=10)]
    old = ops.db.lindex(Q, -1)
    assert old is not None
    ops.db.lpush(Q, old)  # kombu redelivered a copy
    assert copies(ops.db, Q, event_id) == 2
    ops.health.pause(H)
    assert ops.start([event_id]) == ["held"]
    assert ops.start([event_id]) == ["held"]
    assert ops.audit() == []
    ops.health.resume(H)
    ops.release()
    assert ops.state(event_id) == QUEUED
    # The release's message and a stale copy of the old one: one runs, the other finds it busy.
    assert ops.start([event_id]) == ["run"]
    assert ops.start([event_id], owner=OTHER) == ["busy"]
    assert ops.finish(ok(event_id)) == "ok"
    assert ops.start([event_id], owner=OTHER) == ["done"]
    assert ops.audit() == []


def test_pause_and_resume_interleaved_with_sweep_and_start_keep_every_pair_accounted(
    db: redis.Redis, settings: Settings
) -> None:
    # Every order of (pause, resume) against a sweep of a due retry and a start of a queued
    # pair: after a settled release each pair is done, or queued with exactly one message
    # naming it; never dead, the counts right.
    for order in itertools.permutations(["pause", "resume", "sweep", "start"]):
        if order.index("pause") > order.index("resume"):
            continue
        db.flushdb()
        ops = Ops(db, settings, Timeline())
        waiting = ops.event(ago_s=20)
        db.rpop(Q)  # a worker took its message
        assert ops.run(fail(waiting, None, delay_s=1)) == ["run", "ok"]
        queued = ops.event(ago_s=10)  # its message waits on the queue
        ops.tick(2)
        for step in order:
            if step == "pause":
                ops.health.pause(H)
            elif step == "resume":
                ops.health.resume(H)
            elif step == "sweep":
                ops.sweep()
            else:
                db.rpop(Q)
                if ops.start([queued]) == ["run"]:
                    assert ops.finish(ok(queued)) == "ok"
        for _ in range(3):
            ops.release()
            ops.tick(1)
        assert ops.audit() == [], order
        for event_id in (waiting, queued):
            s = ops.state(event_id)
            assert s in (QUEUED, "done"), (order, event_id, s)
            if s == QUEUED:
                assert copies(db, Q, event_id) == 1, (order, event_id)
        assert RecordStore(db, DEAD_KIND).count() == 0


def test_two_schedulers_release_at_the_pace_across_ticks(
    db: redis.Redis, settings: Settings, timeline: Timeline
) -> None:
    one = Ops(db, settings, timeline)
    two = Ops(db, settings, timeline, skew_s=0.3)  # its clock 0.3 s ahead
    ids = [one.event(ago_s=1000 - i) for i in range(200)]
    one.health.pause(H)
    one.start(ids)
    db.delete(Q)
    one.health.resume(H, rate_per_s=20)
    queued_at: list[tuple[float, int]] = []
    start_t = timeline.t
    while timeline.t - start_t < 4.0:
        for sched in (one, two, two, one):
            got = sched.release(rate=5)
            n = sum(r[1] for r in got.released)
            assert n <= 20  # never more than a second's worth at once
            queued_at.append((timeline.t - start_t, n))
        timeline.t += 0.1
    released = [e for e in ids if one.state(e) == QUEUED]
    # Oldest first, no gaps.
    assert released == ids[: len(released)]
    # A second's worth at once, then the pace: at most 20 + 20 / s (+ the 0.3 s skew).
    for t, _ in queued_at:
        upto = sum(n for u, n in queued_at if u <= t)
        assert upto <= 20 + 20 * (t + 0.3) + 1, (t, upto)
    assert len(released) >= 20 + 20 * 3.5
    assert one.audit() == []


def test_a_released_pair_whose_message_is_lost_gets_one_new_message_or_is_held_again(
    ops: Ops,
) -> None:
    ids = [ops.event(ago_s=100 - i) for i in range(4)]
    ops.health.pause(H)
    assert ops.start(ids) == ["held"] * 4
    ops.db.delete(Q)
    ops.health.resume(H)
    assert ops.release().released == ((H, 4, 0),)
    assert [copies(ops.db, Q, e) for e in ids] == [1] * 4
    ops.db.delete(Q)  # the release's messages are lost in transit
    ops.tick(61)
    ops.health.pause(H)  # and the handler is paused again before the sweep sees it
    ops.sweep()
    assert {ops.state(e) for e in ids} == {HELD_STATE}
    assert ops.db.llen(Q) == 0
    ops.health.resume(H)
    ops.release()
    ops.db.delete(Q)
    ops.tick(61)
    ops.sweep()  # lost again, not paused: one new message each
    assert [copies(ops.db, Q, e) for e in ids] == [1] * 4
    ops.tick(61)
    ops.sweep()  # pending now: no copy piles up
    assert [copies(ops.db, Q, e) for e in ids] == [1] * 4
    assert ops.audit() == []


def test_a_probe_whose_worker_died_is_held_again_and_replaced_one_at_a_time(ops: Ops) -> None:
    ids = open_breaker(ops)
    ops.tick(PROBE_S + 1)
    ops.sweep()
    assert {ops.state(e) for e in ids} == {HELD_STATE}
    probe = probe_of(ops.release())
    # A second scheduler at the same time lets no other probe through.
    assert ops.release().probes == ()
    assert ops.start([probe]) == ["run"]
    assert ops.release().probes == ()  # running: still the one probe
    ops.tick(LEASE_S + 1)  # its worker died
    assert ops.release().probes == ()  # its lease ran out, but the sweep has not seen it yet
    ops.sweep()
    assert ops.state(probe) == HELD_STATE
    again = probe_of(ops.release())
    in_flight = [e for e in ids if ops.state(e) in (QUEUED, RUNNING)]
    assert in_flight == [again]
    assert ops.run(ok(again)) == ["run", "ok"]
    assert ops.health.breaker(H) is None
    ops.release()
    assert {ops.state(e) for e in ids if e != again} == {QUEUED}
    assert ops.audit() == []


def test_a_probe_on_its_last_attempt_that_fails_is_held_again_not_dead_lettered(
    ops: Ops,
) -> None:
    ids = open_breaker(ops)
    ops.tick(PROBE_S + 1)
    ops.sweep()
    probe = probe_of(ops.release())
    assert ops.start([probe]) == ["run"]
    assert ops.finish(fail(probe, brk(), exhausted=True)) == "ok"
    assert ops.state(probe) == HELD_STATE
    breaker = ops.breaker(H)
    assert (breaker.state, breaker.probes) == ("open", 1)
    assert RecordStore(ops.db, DEAD_KIND).count() == 0
    assert ops.audit() == []
    assert len(ids) == 3


def test_resume_while_the_probe_runs_then_it_fails_or_succeeds_late(ops: Ops) -> None:
    for late in ("fail", "done"):
        ids = open_breaker(ops)
        ops.tick(PROBE_S + 1)
        ops.sweep()
        probe = probe_of(ops.release())
        assert ops.start([probe]) == ["run"]
        ops.health.resume(H, by="ops")
        assert ops.health.breaker(H) is None
        ops.release()
        others = [e for e in ids if e != probe]
        assert {ops.state(e) for e in others} == {QUEUED}
        if late == "fail":
            assert ops.finish(fail(probe, brk())) == "ok"
            assert ops.breaker(H).state == "closed"  # a fresh run of failures: one
            assert ops.hold_of(H) is None
        else:
            assert ops.finish(ok(probe)) == "ok"
            assert ops.health.breaker(H) is None
        # Exactly one breaker_closed per outage, from the resume.
        kinds = [k for k, _ in ops.notices()]
        assert kinds.count("breaker_closed") == kinds.count("breaker_opened")
        assert ops.audit() == []
        for e in others:
            assert ops.run(ok(e)) == ["run", "ok"]
        ops.sweep()
        ops.tick(10)
        ops.sweep()
        for e in ids:
            if ops.state(e) == QUEUED:
                assert ops.run(ok(e)) == ["run", "ok"]
        assert {ops.state(e) for e in ids} == {"done"}


def test_operator_pause_while_the_breaker_is_open_stops_probes_and_resume_releases(
    ops: Ops,
) -> None:
    ids = open_breaker(ops)
    ops.sweep()
    ops.health.pause(H, reason="vendor incident", by="ops")
    assert ops.hold_of(H) == "operator"
    ops.tick(10 * PROBE_S)
    ops.sweep()
    assert ops.release().probes == ()
    assert {ops.state(e) for e in ids} == {HELD_STATE}
    ops.db.delete(Q)  # the messages the failed runs took (the rig leaves them)
    assert ops.health.resume(H, by="ops") == 3
    assert ops.health.breaker(H) is None
    assert ops.health.breakers() == []
    ops.release()
    assert {ops.state(e) for e in ids} == {QUEUED}
    for e in ids:
        assert copies(ops.db, Q, e) == 1
    kinds = [k for k, _ in ops.notices()]
    # (Three retried failures: their group is not told; the breaker is.)
    assert kinds == ["breaker_opened", "handler_paused", "breaker_closed", "handler_resumed"]
    assert ops.audit() == []


def test_an_exhausted_last_attempt_while_paused_is_held_and_gets_that_attempt_again(
    ops: Ops,
) -> None:
    (event_id,) = [ops.event(ago_s=10)]
    assert ops.start([event_id]) == ["run"]
    ops.health.pause(H)
    assert ops.finish(fail(event_id, None, exhausted=True)) == "ok"
    assert ops.state(event_id) == HELD_STATE
    assert RecordStore(ops.db, DEAD_KIND).count() == 0
    ops.health.resume(H)
    ops.release()
    assert ops.run(ok(event_id)) == ["run", "ok"]
    assert ops.audit() == []


def test_replay_of_a_dead_letter_of_a_held_handler_is_held_then_runs_once(ops: Ops) -> None:
    (event_id,) = [ops.event(ago_s=10)]
    assert ops.run(
        Ending(event_id, "dead", "dead_permanent", reason="permanent", error="Boom: x")
    ) == ["run", "ok"]
    ops.health.pause(H)
    ops.db.delete(Q)
    assert ops.pairs.replay("dead", f"{event_id}.{H}") == Q
    with pytest.raises(Exception, match="no dead letter"):
        ops.pairs.replay("dead", f"{event_id}.{H}")  # a second operator: nothing more
    assert ops.state(event_id) == HELD_STATE
    assert ops.db.llen(Q) == 0
    assert ops.db.ttl(body_key(event_id)) == -1
    assert ops.audit() == []
    ops.health.resume(H)
    ops.release()
    assert copies(ops.db, Q, event_id) == 1
    assert ops.run(ok(event_id)) == ["run", "ok"]
    assert ops.pairs.states(event_id)[H].attempt == 1
    assert ops.audit() == []


def test_forget_of_held_pairs_the_probe_and_a_cut_runs_lock(ops: Ops) -> None:
    entity = "crm:cust-9"
    cut = ops.event(ago_s=600, entity=entity, created=50)
    assert ops.start([cut], owner=OTHER) == ["run"]
    ids = open_breaker(ops)
    ops.tick(LEASE_S + 1)
    ops.sweep()
    assert ops.state(cut) == HELD_STATE
    assert ops.db.get(order_key("crm", "cust-9") + ":lock") is not None
    probe = probe_of(ops.release())
    assert probe == cut  # the oldest
    ops.pairs.forget([cut, ids[0]])
    assert ops.db.get(order_key("crm", "cust-9") + ":lock") is None
    assert ops.audit() == []
    # The forgotten probe is replaced by the next oldest.
    probe = probe_of(ops.release())
    assert probe == ids[1]
    assert ops.run(ok(probe)) == ["run", "ok"]
    ops.release()
    assert ops.state(ids[2]) == QUEUED
    assert [h.held for h in ops.health.holds()] in ([], [0])
    assert ops.audit() == []


def test_ordered_pairs_held_and_released_apply_in_version_order(ops: Ops) -> None:
    entity = "crm:cust-1"
    # Received in reverse of their versions; v200's run is cut, then the handler is paused.
    v100 = ops.event(ago_s=50, entity=entity, created=100)
    v200 = ops.event(ago_s=100, entity=entity, created=200)
    v300 = ops.event(ago_s=10, entity=entity, created=300)
    assert ops.start([v200], owner=OTHER) == ["run"]
    ops.health.pause(H)
    ops.tick(LEASE_S + 1)
    ops.sweep()
    assert ops.start([v100, v300]) == ["held", "held"]
    assert {ops.state(e) for e in (v100, v200, v300)} == {HELD_STATE}
    ops.health.resume(H)
    ops.db.delete(Q)
    applied: list[str] = []
    for _ in range(20):
        ops.release()
        ops.tick(2)
        ops.sweep()
        while ops.db.llen(Q):
            for event_id in take(ops.db, Q)["ids"]:
                got = ops.start([event_id])
                if got == ["run"]:
                    assert ops.finish(ok(event_id)) == "ok"
                    applied.append(event_id)
        if all(ops.state(e) in ("done", "stale") for e in (v100, v200, v300)):
            break
    # v200 (the cut run) first; v100 is then stale; v300 after it.
    assert applied == [v200, v300]
    assert ops.state(v100) == "stale"
    assert ops.audit() == []


def test_failure_groups_of_many_handlers_count_and_close_apart(ops: Ops) -> None:
    handlers = [f"crm.h{i}" for i in range(12)]
    ids: dict[str, list[str]] = {}
    for i, h in enumerate(handlers):
        ids[h] = [ops.event([(h, Q)], ago_s=100) for _ in range(i % 3 + 2)]
        for event_id in ids[h][:-1]:
            assert ops.run(fail(event_id, None), h) == ["run", "ok"]
    groups = {g.handler: g for g in ops.health.groups(limit=1000)}
    assert set(groups) == set(handlers)
    for i, h in enumerate(handlers):
        assert groups[h].count == i % 3 + 1
        assert groups[h].samples == tuple(ids[h][:-1])
    # One handler recovers: only its group closes.
    h0 = handlers[0]
    assert ops.run(ok(ids[h0][-1]), h0) == ["run", "ok"]
    still = {g.handler for g in ops.health.groups(limit=1000)}
    assert still == set(handlers) - {h0}
    kinds = Counter(k for k, _ in ops.notices())
    # At most three retried failures each: blips, not told (a group is told at its fifth).
    assert kinds == Counter()


def test_notices_are_written_once_per_transition_through_an_outage(ops: Ops) -> None:
    ids = [ops.event(ago_s=500 - i) for i in range(5)]
    assert ops.start(ids) == ["run"] * 5
    for event_id in ids:  # failures beyond the threshold (runs started before it opened)
        assert ops.finish(fail(event_id, brk())) == "ok"
    ops.tick(PROBE_S + 1)
    ops.sweep()
    for _ in range(2):  # two probes fail: no more "opened"
        probe = probe_of(ops.release())
        assert ops.run(fail(probe, brk())) == ["run", "ok"]
        ops.tick(4 * PROBE_S + 1)
        ops.sweep()
    probe = probe_of(ops.release())
    assert ops.release().probes == ()  # a second scheduler
    assert ops.run(ok(probe)) == ["run", "ok"]
    # Another success after: no second closing.
    ops.release()
    other = next(e for e in ids if ops.state(e) == QUEUED)
    assert ops.run(ok(other)) == ["run", "ok"]
    kinds = [k for k, _ in ops.notices()]
    assert kinds == ["breaker_opened", "group_opened", "breaker_closed", "group_closed"]
    assert ops.audit() == []


def test_a_held_pair_keeps_its_body_while_its_siblings_dead_letter_is_purged(ops: Ops) -> None:
    event_id = ops.event([(H, Q), (A, Q)], ago_s=10)
    assert ops.run(
        Ending(event_id, "dead", "dead_permanent", reason="permanent", error="Boom: x"), A
    ) == ["run", "ok"]
    ops.health.pause(H)
    assert ops.start([event_id]) == ["held"]
    assert ops.pairs.purge("dead", [f"{event_id}.{A}"]) == 1
    assert ops.db.exists(body_key(event_id)) == 1
    assert ops.db.ttl(body_key(event_id)) == -1
    ops.health.resume(H)
    ops.release()
    started = ops.pairs.start(H, [event_id], OWNER, max_starts=5, seq=None, queue=Q, defer_s=1)
    assert started[0].what == "run"
    assert started[0].body == '{"n": 1}'
    assert ops.audit() == []
