"""Holding, the breaker and failure groups, through the store's real transitions.

A worker's endings are played by hand here (``tests/support/store.py``), on a Redis database no
worker reads: what each step leaves is what production leaves. The same behaviour on real
processes is in ``tests/faults/test_outage.py``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.store.health import Breaker, Health, HealthError
from calhook.store.keys import HELD_STATE, QUEUED, pairs_key
from calhook.store.pairs import Ending, PairStore
from calhook.store.queues import queue_table, render_table, throughput_key
from calhook.store.records import DEAD, RecordStore
from tests.support.store import OWNER, accept, dead_letter, route, start

H, Q = "crm.sync_customer", "crm"
BREAKER: dict[str, Any] = {"c": H, "h": [H], "n": 3, "w": 60_000, "p": 30_000, "m": 120_000}


def _fail(
    event_id: str, *, exhausted: bool = False, breaker: dict[str, Any] | None = BREAKER
) -> Ending:
    if exhausted:
        return Ending(
            event_id,
            "dead",
            "dead_exhausted",
            reason="exhausted",
            error="CrmUnavailable: HubSpot answered 503",
            gist="CrmUnavailable: HubSpot answered 503",
            breaker=breaker,
        )
    return Ending(
        event_id,
        "retry",
        "retry_scheduled",
        delay_s=0.0,
        error="CrmUnavailable: HubSpot answered 503",
        gist="CrmUnavailable: HubSpot answered 503",
        breaker=breaker,
    )


def _run(pairs: PairStore, event_id: str, ending: Ending, now_s: float | None = None) -> list[str]:
    """Start the pair and end it; what the start came to (and the finish's result after)."""
    got = [
        s.what
        for s in pairs.start(H, [event_id], OWNER, max_starts=5, seq=None, queue=Q, defer_s=1.0)
    ]
    if got == ["run"]:
        got += pairs.finish(H, OWNER, throughput_key(Q), [ending])
    return got


def _routed(pairs: PairStore, n: int, *, spacing_s: float = 0.0) -> list[str]:
    ids = []
    base = time.time() - 3600
    for i in range(n):
        event_id = accept(
            pairs, f'{{"n": {i}}}'.encode(), received_at=base + i * max(spacing_s, 0.001)
        )
        route(pairs, event_id, [(H, Q)])
        ids.append(event_id)
    return ids


def _state(pairs: PairStore, event_id: str) -> str:
    return pairs.states(event_id)[H].state


def _counts(client: redis.Redis, state: str) -> int:
    return int(client.hget(pairs_key(state), Q) or 0)


def _breaker(health: Health) -> Breaker:
    """H's breaker, which must be there."""
    breaker = health.breaker(H)
    assert breaker is not None
    return breaker


def _notice_kinds(client: redis.Redis) -> list[str]:
    entries = client.xrange("calhook:notices")
    assert entries is not None
    kinds = []
    for _, fields in entries:
        assert fields is not None
        kind = fields[b"kind"]
        assert isinstance(kind, bytes)
        kinds.append(kind.decode())
    return kinds


@pytest.fixture
def health(quiet_pairs: PairStore) -> Health:
    return Health(quiet_pairs.scripts)


def test_a_paused_handler_holds_its_pairs_without_spending_attempts(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 3)
    assert health.pause(H, reason="HubSpot maintenance", by="ops") == ""
    assert start(quiet_pairs, H, ids, Q) == ["held"] * 3
    for event_id in ids:
        state = quiet_pairs.states(event_id)[H]
        assert (state.state, state.attempt, state.starts) == (HELD_STATE, 1, 0)
    assert _counts(quiet_db, HELD_STATE) == 3
    assert _counts(quiet_db, QUEUED) == 0
    # A copy of a message that names a held pair runs nothing.
    assert start(quiet_pairs, H, ids[:1], Q) == ["held"]
    (hold,) = health.holds()
    assert (hold.handler, hold.by, hold.reason, hold.held) == (H, "ops", "HubSpot maintenance", 3)
    assert hold.oldest_at is not None
    assert hold.oldest_at < time.time() - 3000
    # New events for it are held at once: no message is queued for them.
    before = quiet_db.llen(Q)
    (late,) = _routed(quiet_pairs, 1)
    assert _state(quiet_pairs, late) == HELD_STATE
    assert quiet_db.llen(Q) == before
    # Nothing is released while it is paused.
    assert health.release(rate_per_s=100, most=1000, batch_max=10).released == ()


def test_resume_releases_the_held_pairs_oldest_first_at_the_pace(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 12, spacing_s=1.0)
    health.pause(H)
    start(quiet_pairs, H, list(reversed(ids)), Q)
    quiet_db.delete(Q)
    assert health.resume(H, rate_per_s=5) == 12
    with pytest.raises(HealthError):
        health.resume(H)
    # The scheduler's ticks, on the store's clock moved by hand (no sleep).
    now = time.time()

    def release(at_s: float) -> list[tuple[str, int, int]]:
        raw = health.scripts.call("release", ["100", 1000, 1, 1000], now_s=now + at_s)
        return [(r[1].decode(), int(r[2]), int(r[3])) for r in raw]

    # A second's worth at the chosen pace (5/s), the oldest ones.
    assert release(0) == [(H, 5, 7)]
    queued = [e for e in ids if _state(quiet_pairs, e) == QUEUED]
    assert queued == ids[:5]
    assert release(0.45) == [(H, 2, 5)]
    assert [e for e in ids if _state(quiet_pairs, e) == QUEUED] == ids[:7]
    release(1.55)
    assert all(_state(quiet_pairs, e) == QUEUED for e in ids)
    assert health.holds() == []
    assert _counts(quiet_db, HELD_STATE) == 0
    assert _counts(quiet_db, QUEUED) == 12
    # Each released pair runs once, as attempt 1.
    assert [s for e in ids for s in start(quiet_pairs, H, [e], Q)] == ["run"] * 12
    assert {quiet_pairs.states(e)[H].attempt for e in ids} == {1}


def test_the_breaker_opens_after_a_run_of_transient_failures_and_holds(
    quiet_pairs: PairStore, health: Health
) -> None:
    ids = _routed(quiet_pairs, 6)
    assert _run(quiet_pairs, ids[0], _fail(ids[0])) == ["run", "ok"]
    assert _run(quiet_pairs, ids[1], _fail(ids[1])) == ["run", "ok"]
    assert _breaker(health).state == "closed"
    assert _run(quiet_pairs, ids[2], _fail(ids[2])) == ["run", "ok"]
    breaker = _breaker(health)
    assert (breaker.state, breaker.failures, breaker.error) == ("open", 3, "CrmUnavailable")
    assert [b.circuit for b in health.breakers()] == [H]
    # Open: the next pairs are held, the failed ones too once due (the sweep).
    assert start(quiet_pairs, H, ids[3:], Q) == ["held"] * 3
    quiet_pairs.sweep(limit=100, batch_max=10, now_s=time.time() + 5)
    assert {_state(quiet_pairs, e) for e in ids} == {HELD_STATE}
    (hold,) = health.holds()
    assert (hold.by, hold.circuit, hold.held) == ("breaker", H, 6)


def test_a_permanent_error_or_a_success_between_never_opens_it(
    quiet_pairs: PairStore, health: Health
) -> None:
    ids = _routed(quiet_pairs, 8)
    for event_id in ids[:2]:
        _run(quiet_pairs, event_id, _fail(event_id))
    permanent = Ending(
        ids[2],
        "dead",
        "dead_permanent",
        reason="permanent",
        error="CrmRejected: HubSpot answered 400",
        gist="x",
    )
    for event_id in ids[3:5]:
        _run(
            quiet_pairs,
            event_id,
            permanent.__class__(
                event_id,
                "dead",
                "dead_permanent",
                reason="permanent",
                error="CrmRejected: HubSpot answered 400",
            ),
        )
    assert _breaker(health).state == "closed"
    assert _breaker(health).failures == 2
    _run(quiet_pairs, ids[5], Ending(ids[5], "done", "ok"))
    assert health.breaker(H) is None
    _run(quiet_pairs, ids[6], _fail(ids[6]))
    _run(quiet_pairs, ids[7], _fail(ids[7]))
    assert _breaker(health).state == "closed"


def test_half_open_probe_fails_then_succeeds_and_releases(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 5, spacing_s=1.0)
    for event_id in ids[:3]:
        _run(quiet_pairs, event_id, _fail(event_id))
    start(quiet_pairs, H, ids[3:], Q)
    now = time.time()
    # Not yet time to probe.
    assert health.release(rate_per_s=100, most=1000, batch_max=10).probes == ()
    quiet_pairs.sweep(limit=100, batch_max=10, now_s=now + 5)
    # Probe time: the oldest held pair is let through, alone.
    quiet_db.delete(Q)
    released = health.scripts.call("release", ["100", 1000, 10], now_s=now + 31)
    assert [r[0] for r in released] == [b"probe"]
    probe_id = released[0][2].decode().split("/")[0]
    assert probe_id == ids[0]
    assert _state(quiet_pairs, probe_id) == QUEUED
    assert _breaker(health).state == "half_open"
    assert quiet_db.llen(Q) == 1
    # The others stay held; the probe runs although the handler is held, and fails.
    assert _run(quiet_pairs, probe_id, _fail(probe_id)) == ["run", "ok"]
    breaker = _breaker(health)
    assert (breaker.state, breaker.probes) == ("open", 1)
    assert breaker.probe_at is not None
    assert breaker.probe_at > now + 55  # twice as long
    # Next probe: it succeeds, the breaker closes, the rest is released at the pace.
    quiet_pairs.sweep(limit=100, batch_max=10, now_s=now + 100)
    released = health.scripts.call("release", ["100", 1000, 10], now_s=now + 200)
    probe_id = released[0][2].decode().split("/")[0]
    assert _run(quiet_pairs, probe_id, Ending(probe_id, "done", "ok")) == ["run", "ok"]
    assert health.breaker(H) is None
    assert health.breakers() == []
    health.release(rate_per_s=100, most=1000, batch_max=10)
    assert {_state(quiet_pairs, e) for e in ids if e != probe_id} == {QUEUED}
    assert RecordStore(quiet_db, DEAD).count() == 0


def test_a_lost_probe_is_replaced(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 4)
    for event_id in ids[:3]:
        _run(quiet_pairs, event_id, _fail(event_id))
    now = time.time()
    quiet_pairs.sweep(limit=100, batch_max=10, now_s=now + 5)
    released = health.scripts.call("release", ["100", 1000, 10], now_s=now + 31)
    probe = released[0][2].decode()
    # Its message is lost and the sweep finds it: held again (it is no probe to the sweep).
    quiet_db.delete(Q)
    quiet_pairs.sweep(limit=100, batch_max=10, hold_s=0, now_s=now + 400)
    assert _state(quiet_pairs, probe.split("/")[0]) == HELD_STATE
    released = health.scripts.call("release", ["100", 1000, 10], now_s=now + 401)
    assert [r[0] for r in released] == [b"probe"]
    assert _breaker(health).state == "half_open"


def test_an_exhausted_pair_is_held_not_dead_lettered_while_its_breaker_is_open(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 4)
    for event_id in ids[:3]:
        _run(quiet_pairs, event_id, _fail(event_id))
    assert _breaker(health).state == "open"
    # ids[3] was running when the breaker opened, on its last attempt.
    assert _run(quiet_pairs, ids[3], _fail(ids[3], exhausted=True)) == ["held"]
    health.resume(H)
    health.release(rate_per_s=100, most=1000, batch_max=10)
    assert start(quiet_pairs, H, [ids[3]], Q) == ["run"]
    assert quiet_pairs.finish(H, OWNER, throughput_key(Q), [_fail(ids[3], exhausted=True)]) == [
        "ok"
    ]
    assert _state(quiet_pairs, ids[3]) == "dead"


def test_failure_groups_count_sample_and_close_on_recovery(
    quiet_pairs: PairStore, health: Health
) -> None:
    ids = _routed(quiet_pairs, 9)
    for event_id in ids[:7]:
        _run(quiet_pairs, event_id, _fail(event_id, breaker=None))
    dead_letter(
        quiet_pairs, accept(quiet_pairs, b'{"z": 1}'), H, Q, error="CrmRejected: 400 for 'Anna'"
    )
    # (Most recently seen first; two seen within the same millisecond come in id order.)
    groups = sorted(health.groups(), key=lambda g: g.error)
    assert [(g.error, g.reason, g.count) for g in groups] == [
        ("CrmRejected", "permanent", 1),
        ("CrmUnavailable", "transient", 7),
    ]
    transient = groups[1]
    assert transient.samples == tuple(ids[2:7])
    assert transient.message == "CrmUnavailable: HubSpot answered 503"
    assert transient.state == "open"
    assert transient.first <= transient.last
    health.acknowledge(transient.id, by="ops")
    assert health.group(transient.id).state == "acknowledged"
    # A success of the handler closes the transient group, not the permanent one.
    _run(quiet_pairs, ids[7], Ending(ids[7], "done", "ok"))
    assert health.group(transient.id).state == "closed"
    assert [g.reason for g in health.groups()] == ["permanent"]
    with pytest.raises(HealthError, match="closed already"):
        health.resolve(transient.id)
    health.resolve(groups[0].id, by="ops")
    assert health.groups() == []
    assert health.group(groups[0].id).by == "ops"
    # The same failure again opens the group anew.
    _run(quiet_pairs, ids[8], _fail(ids[8], breaker=None))
    (again,) = health.groups()
    assert (again.id, again.count, again.state) == (transient.id, 1, "open")


def test_notices_are_written_once_per_transition(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 8)
    # Two retried failures, then three with the breaker counting (it opens at the third): the
    # group is told at its fifth failure, after the breaker.
    for event_id in ids[:2]:
        _run(quiet_pairs, event_id, _fail(event_id, breaker=None))
    for event_id in ids[2:5]:
        _run(quiet_pairs, event_id, _fail(event_id))
    health.pause(H, by="ops", reason="x")
    health.pause(H, by="ops", reason="y")
    health.resume(H, by="ops")
    health.release(rate_per_s=100, most=1000, batch_max=10)
    _run(quiet_pairs, ids[5], Ending(ids[5], "done", "ok"))
    kinds = _notice_kinds(quiet_db)
    assert kinds == [
        "breaker_opened",
        "group_opened",
        "handler_paused",
        "breaker_closed",
        "handler_resumed",
        "group_closed",
    ]


def test_a_blip_of_retried_failures_is_not_told(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 10)
    for n in range(5):
        # Four failures and a success, twice less one: never five in a group.
        for event_id in ids[2 * n : 2 * n + 1]:
            _run(quiet_pairs, event_id, _fail(event_id, breaker=None))
        _run(quiet_pairs, ids[2 * n + 1], Ending(ids[2 * n + 1], "done", "ok"))
    assert _notice_kinds(quiet_db) == []
    # The groups were kept all the same, each closed by the success after it.
    (group,) = health.groups(states=("closed",))
    assert group.count == 1
    # A dead letter is told at once.
    dead_letter(quiet_pairs, accept(quiet_pairs, b'{"z": 2}'), H, Q, error="CrmRejected: 400")
    assert _notice_kinds(quiet_db) == ["group_opened"]


def test_forget_drops_a_held_pair(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    (event_id,) = _routed(quiet_pairs, 1)
    health.pause(H)
    start(quiet_pairs, H, [event_id], Q)
    quiet_pairs.forget([event_id])
    assert _counts(quiet_db, HELD_STATE) == 0
    assert health.holds()[0].held == 0
    health.resume(H)
    health.release(rate_per_s=100, most=1000, batch_max=10)
    assert health.holds() == []


def test_a_dispatch_pair_is_never_held(quiet_pairs: PairStore, health: Health) -> None:
    health.pause("@dispatch")
    event_id = accept(quiet_pairs)
    assert start(quiet_pairs, "@dispatch", [event_id], DISPATCH_QUEUE) == ["run"]


def test_the_queue_view_shows_held_pairs_and_how_long_the_oldest_has_waited(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 3, spacing_s=60.0)
    health.pause(H)
    start(quiet_pairs, H, ids, Q)
    (row,) = [r for r in queue_table(quiet_db, [Q]) if r.queue == Q]
    assert (row.ready, row.held) == (0, 3)
    assert row.oldest_held_age_s is not None
    assert 3590 < row.oldest_held_age_s < 3700
    line = next(x for x in render_table([row]).splitlines() if x.startswith(Q))
    assert line.split()[5] == "3"
    assert line.split()[9] == "60m"


def test_a_failed_probe_goes_back_to_the_held_without_spending_its_attempt(
    quiet_pairs: PairStore, health: Health
) -> None:
    ids = _routed(quiet_pairs, 4)
    for event_id in ids[:3]:
        _run(quiet_pairs, event_id, _fail(event_id))
    now = time.time()
    # The failure that opened it is held with its attempt; so is each failed probe after.
    assert quiet_pairs.states(ids[2])[H].state == HELD_STATE
    for n in range(4):
        quiet_pairs.sweep(limit=100, batch_max=10, now_s=now + 5)
        released = health.scripts.call(
            "release", ["100", 1000, 10, 1000], now_s=now + 1000 * (n + 1)
        )
        probe = released[0][2].decode().split("/")[0]
        assert _run(quiet_pairs, probe, _fail(probe)) == ["run", "ok"]
        state = quiet_pairs.states(probe)[H]
        assert (state.state, state.due_s) == (HELD_STATE, None)
    # Four probes failed and the first two events were retried once: no one walked the schedule.
    assert max(quiet_pairs.states(e)[H].attempt for e in ids) <= 2


def test_new_events_go_straight_through_while_held_ones_are_released(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 20)
    health.pause(H)
    start(quiet_pairs, H, ids, Q)
    quiet_db.delete(Q)
    health.resume(H, rate_per_s=5)
    health.release(rate_per_s=100, most=1000, batch_max=1)
    (late,) = _routed(quiet_pairs, 1)
    # Not lined up behind the 15 still held: its own flow is never held back by the release.
    assert _state(quiet_pairs, late) == QUEUED
    assert health.holds()[0].held == 15


def test_a_slower_scheduler_releases_a_ticks_worth_at_a_time(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    ids = _routed(quiet_pairs, 100)
    health.pause(H)
    start(quiet_pairs, H, ids, Q)
    health.resume(H, rate_per_s=5)
    now = time.time()
    counts = []
    for n in range(3):  # a scheduler ticking every 5 s
        raw = health.scripts.call("release", ["100", 1000, 10, 5000], now_s=now + 5 * n)
        counts.append(int(raw[0][2]) if raw else 0)
    assert counts == [25, 25, 25]
