"""The pair state machine, driven step by step through its real scripts on a real Redis.

Each test is one of the ways the old core (ledger, delayed store, watchdog copies, fan-out
marker, delivery counter, order lock) lost order, ran a retry twice or piled up copies (issue
11), replayed as the sequence of steps that broke it. The clock is the scripts' argument, so
"an hour later" is an argument, not a sleep. A database of its own: the session's worker never
takes these messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.messages import read_task_message
from calhook.settings import Settings
from calhook.store.connect import pair_store
from calhook.store.keys import DISPATCH_PAIR, DUE, UNACKED, UNACKED_INDEX, pairs_key
from calhook.store.pairs import Ending, PairStore, Route
from calhook.store.queues import throughput_key
from tests.support import store

CRM = ("crm.sync", "crm")
LEASE_S = 60.0
RECOVER_S = 60.0
HOLD_S = 360.0  # what a live worker may hold a message before starting it


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    # The URL's own database number wins over a db= argument: replace it in the URL.
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/12")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def core(db: redis.Redis, make_settings: Callable[..., Settings]) -> PairStore:
    return pair_store(db, make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S))


def start(core: PairStore, pair: str, ids: list[str], owner: str, queue: str) -> list[str]:
    started = core.start(pair, ids, owner, max_starts=3, seq=None, queue=queue, defer_s=1.0)
    return [s.what for s in started]


def messages(db: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [read_task_message(m)[2] for m in db.lrange(queue, 0, -1)]


def routed(core: PairStore, handlers: list[tuple[str, str]], **order: str) -> str:
    """An accepted event, dispatched to ``handlers``; its handler messages are on their queues."""
    event_id = store.accept(core)
    assert start(core, DISPATCH_PAIR, [event_id], "w0", DISPATCH_QUEUE) == ["run"]
    received = orjson.dumps({"at": time.time(), "what": "received"})
    entity, version = order.get("entity", ""), order.get("version", "")
    decision = Route(event_id, "x", received, [(h, q, entity, version) for h, q in handlers])
    assert core.fan_out(throughput_key(DISPATCH_QUEUE), 1, [decision]) == ["ok"]
    return event_id


def finish(core: PairStore, owner: str, ending: Ending, pair: str = CRM[0]) -> str:
    return core.finish(pair, owner, throughput_key(CRM[1]), [ending])[0]


def later(s: float) -> float:
    return time.time() + s


def test_a_dead_workers_order_lock_makes_later_events_wait_not_fail(
    db: redis.Redis, core: PairStore
) -> None:
    """Scenario 1: a child killed inside an ordered handler left its entity locked for 300 s;
    every later event of the entity spent a retry step per 5 s wait and was dead in 47 s."""
    first = routed(core, [CRM], entity="crm:customer:c1", version="100|1|a")
    second = routed(core, [CRM], entity="crm:customer:c1", version="200|1|b")
    # Given the first event's run holds the entity, and its worker dies (no finish, no beat)
    assert start(core, *CRM[:1], [first], "dead-worker", CRM[1]) == ["run"]

    # When the second event is started again and again while the lock is held
    for _ in range(10):
        assert start(core, CRM[0], [second], "w1", CRM[1]) in (["deferred"], ["early"])
        core.sweep(limit=100, batch_max=1, now_s=later(2))

    # Then it only waited: no attempt spent, nothing dead
    assert core.states(second)[CRM[0]].attempt == 1
    assert db.zcard("calhook:dead") == 0
    # And once the dead run's lease is over, the sweep queues it again, and both complete
    assert core.sweep(limit=100, batch_max=1, now_s=later(LEASE_S + 1)).expired == 1
    assert start(core, CRM[0], [first], "w2", CRM[1]) == ["run"]
    assert finish(core, "w2", Ending(first, "done", "ok")) == "ok"
    assert core.states(second)[CRM[0]].state in ("queued", "waiting")
    core.sweep(limit=100, batch_max=1, now_s=later(LEASE_S + 5))
    assert start(core, CRM[0], [second], "w3", CRM[1]) == ["run"]
    assert finish(core, "w3", Ending(second, "done", "ok")) == "ok"
    assert [core.states(e)[CRM[0]].state for e in (first, second)] == ["done", "done"]
    assert db.hget("calhook:order:crm:customer:c1", "event_id") == b"b"
    assert not db.exists("calhook:order:crm:customer:c1:lock")


def test_an_older_event_of_the_entity_ends_stale_without_running(
    db: redis.Redis, core: PairStore
) -> None:
    newer = routed(core, [CRM], entity="crm:customer:c1", version="200|1|b")
    older = routed(core, [CRM], entity="crm:customer:c1", version="100|1|a")
    assert start(core, CRM[0], [newer], "w1", CRM[1]) == ["run"]
    assert finish(core, "w1", Ending(newer, "done", "ok")) == "ok"

    assert start(core, CRM[0], [older], "w1", CRM[1]) == ["stale"]
    assert core.states(older)[CRM[0]].state == "stale"
    assert not db.exists(f"calhook:body:{older}")


def test_a_backlog_older_than_the_recovery_interval_gets_no_copies(
    db: redis.Redis, core: PairStore
) -> None:
    """Scenario 2: every 30 min of a dispatch backlog queued another full copy; the 6th was
    parked as poison though dispatch succeeded, and an unconsumed queue grew until Redis was
    full."""
    event_ids = [store.accept(core) for _ in range(3)]
    db.lpush(DISPATCH_QUEUE, b"a message of someone else, still waiting ahead of ours")
    waiting = db.llen(DISPATCH_QUEUE)

    # When the scheduler sweeps again and again for hours while nobody consumes
    for hours in range(1, 12):
        swept = core.sweep(limit=100, batch_max=1, now_s=later(hours * 1800))
        assert (swept.lost, swept.due, swept.expired) == (0, 0, 0)

    # Then the queue holds what it held: no copy
    assert db.llen(DISPATCH_QUEUE) == waiting
    # And when a worker finally takes the messages, each event is dispatched once, not poison
    assert start(core, DISPATCH_PAIR, event_ids, "w1", DISPATCH_QUEUE) == ["run"] * 3
    assert [core.states(e)[DISPATCH_PAIR].starts for e in event_ids] == [1, 1, 1]


def test_a_message_lost_in_transit_is_queued_again_once(db: redis.Redis, core: PairStore) -> None:
    """RELIABILITY.md item 15: taken by BRPOP, never recorded as unacked."""
    event_id = routed(core, [CRM])
    assert db.rpop(CRM[1]) is not None  # the message vanishes with the connection

    assert core.sweep(limit=100, batch_max=1, now_s=later(1)).lost == 0  # not yet
    swept = core.sweep(limit=100, batch_max=1, now_s=later(RECOVER_S + 1))
    again = core.sweep(limit=100, batch_max=1, now_s=later(3 * RECOVER_S))

    assert (swept.lost, again.lost) == (1, 0)
    assert [m["ids"] for m in messages(db, CRM[1])] == [[event_id]]
    assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]


def test_a_message_held_unacked_by_a_worker_is_not_copied(db: redis.Redis, core: PairStore) -> None:
    event_id = routed(core, [CRM])
    raw = db.rpop(CRM[1])
    assert isinstance(raw, bytes)
    tag = orjson.loads(raw)["properties"]["delivery_tag"]
    # prefetched by a worker, as kombu records it (QoS.append)
    db.zadd(UNACKED_INDEX, {tag: time.time()})
    db.hset(UNACKED, tag, orjson.dumps([orjson.loads(raw), "", CRM[1]]))

    swept = core.sweep(limit=100, batch_max=1, hold_s=HOLD_S, now_s=later(RECOVER_S + 1))

    assert (swept.lost, swept.pending) == (0, 1)
    assert db.llen(CRM[1]) == 0
    assert core.states(event_id)[CRM[0]].state == "queued"


def test_a_message_held_by_a_dead_worker_is_queued_again_after_the_hold(
    db: redis.Redis, core: PairStore
) -> None:
    """kombu hands it back only after the visibility timeout (and checks every 100 s)."""
    event_id = routed(core, [CRM])
    raw = db.rpop(CRM[1])
    assert isinstance(raw, bytes)
    tag = orjson.loads(raw)["properties"]["delivery_tag"]
    db.zadd(UNACKED_INDEX, {tag: time.time()})
    db.hset(UNACKED, tag, orjson.dumps([orjson.loads(raw), "", CRM[1]]))

    held = core.sweep(limit=100, batch_max=1, hold_s=HOLD_S, now_s=later(HOLD_S - 1))
    swept = core.sweep(limit=100, batch_max=1, hold_s=HOLD_S, now_s=later(HOLD_S + RECOVER_S))
    again = core.sweep(limit=100, batch_max=1, hold_s=HOLD_S, now_s=later(HOLD_S + 3 * RECOVER_S))

    assert (held.lost, swept.lost, again.lost) == (0, 1, 0)
    assert [m["ids"] for m in messages(db, CRM[1])] == [[event_id]]


def test_a_scheduler_down_for_long_queues_each_due_retry_once(
    db: redis.Redis, core: PairStore
) -> None:
    """Scenario 3: the retry waited in the delayed store and its watchdog entry held the same
    message; a scheduler back after CALHOOK_WATCHDOG_S pushed both, two workers ran both."""
    event_id = routed(core, [CRM])
    db.delete(CRM[1])
    assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    assert finish(core, "w1", Ending(event_id, "retry", "retry_scheduled", delay_s=10)) == "ok"

    # When the scheduler comes back hours after the retry was due, and sweeps twice
    first = core.sweep(limit=100, batch_max=1, now_s=later(4 * 3600))
    second = core.sweep(limit=100, batch_max=1, now_s=later(4 * 3600 + 1))

    # Then one message, and two workers taking copies of it run it once
    assert (first.due, second.queued) == (1, 0)
    assert db.llen(CRM[1]) == 1
    assert start(core, CRM[0], [event_id], "w2", CRM[1]) == ["run"]
    assert start(core, CRM[0], [event_id], "w3", CRM[1]) == ["busy"]
    assert core.states(event_id)[CRM[0]].attempt == 2


def test_a_copy_failing_after_another_succeeded_changes_nothing(
    db: redis.Redis, core: PairStore
) -> None:
    """Scenario 4: B succeeded and cancelled the watchdog entry, A failed a moment later and
    armed it again: a no-op every 30 min, the body kept, and poison once the ledger expired."""
    event_id = routed(core, [CRM])
    assert start(core, CRM[0], [event_id], "A", CRM[1]) == ["run"]
    core.sweep(limit=100, batch_max=1, now_s=later(LEASE_S + 1))  # A stalls past its lease
    assert start(core, CRM[0], [event_id], "B", CRM[1]) == ["run"]

    assert finish(core, "B", Ending(event_id, "done", "ok")) == "ok"
    late = Ending(event_id, "retry", "retry_scheduled", delay_s=10)

    assert finish(core, "A", late) == "late"
    assert core.states(event_id)[CRM[0]].state == "done"
    assert db.zcard(DUE) == 0
    assert not db.exists(f"calhook:body:{event_id}")
    assert db.zcard("calhook:dead") == 0


def test_a_run_that_lost_its_lease_cannot_fail_the_pair_of_the_run_that_has_it(
    db: redis.Redis, core: PairStore
) -> None:
    event_id = routed(core, [CRM])
    assert start(core, CRM[0], [event_id], "A", CRM[1]) == ["run"]
    core.sweep(limit=100, batch_max=1, now_s=later(LEASE_S + 1))
    assert start(core, CRM[0], [event_id], "B", CRM[1]) == ["run"]

    dead = Ending(event_id, "dead", "dead_permanent", reason="permanent", error="no")
    assert finish(core, "A", dead) == "lost"

    assert core.states(event_id)[CRM[0]].state == "running"
    assert db.zcard("calhook:dead") == 0


def test_two_operators_replaying_one_dead_letter_queue_it_once(
    db: redis.Redis, core: PairStore
) -> None:
    """Scenario 5: the record was read outside the transaction, so both replays queued it."""
    event_id = store.accept(core)
    store.dead_letter(core, event_id, *CRM)
    db.delete(CRM[1], DISPATCH_QUEUE)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def replay() -> None:
        barrier.wait()
        try:
            results.append(core.replay("dead", f"{event_id}.{CRM[0]}"))
        except Exception as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=replay) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results) == ["ReplayError"] * 7 + [CRM[1]]
    assert db.llen(CRM[1]) == 1
    assert core.states(event_id)[CRM[0]].state == "queued"


def test_two_operators_replaying_one_parked_event_dispatch_it_once(
    db: redis.Redis, core: PairStore
) -> None:
    event_id = store.accept(core)
    store.park(core, event_id)
    db.delete(DISPATCH_QUEUE)

    assert core.replay("parked", event_id) == DISPATCH_QUEUE
    with pytest.raises(Exception, match="no parked event"):
        core.replay("parked", event_id)

    assert db.llen(DISPATCH_QUEUE) == 1
    assert core.states(event_id)[DISPATCH_PAIR].state == "queued"


def test_a_pair_started_too_often_without_finishing_is_poison(
    db: redis.Redis, core: PairStore
) -> None:
    event_id = routed(core, [CRM])
    for n in range(3):  # max_starts=3 in start() above
        assert start(core, CRM[0], [event_id], f"w{n}", CRM[1]) == ["run"]
        # a copy taken meanwhile is no start
        assert start(core, CRM[0], [event_id], "copy", CRM[1]) == ["busy"]
        # the worker dies: its lease runs out and the sweep queues the pair again
        assert core.sweep(limit=100, batch_max=1, now_s=later((n + 1) * (LEASE_S + 1))).expired

    assert start(core, CRM[0], [event_id], "w3", CRM[1]) == ["poison"]
    record = db.hgetall(f"calhook:dead:{event_id}.{CRM[0]}")
    assert record[b"reason"] == b"poison"
    assert core.states(event_id)[CRM[0]].state == "dead"


def test_no_op_copies_and_recovery_messages_are_not_counted_as_poison(
    db: redis.Redis, core: PairStore
) -> None:
    event_id = routed(core, [CRM])
    assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    for _ in range(10):
        assert start(core, CRM[0], [event_id], "copy", CRM[1]) == ["busy"]
    assert finish(core, "w1", Ending(event_id, "done", "ok")) == "ok"
    for _ in range(10):
        assert start(core, CRM[0], [event_id], "copy", CRM[1]) == ["done"]

    assert core.states(event_id)[CRM[0]].starts == 1
    assert db.zcard("calhook:dead") == 0


def test_waiting_for_a_rate_limit_spends_no_attempt(db: redis.Redis, core: PairStore) -> None:
    event_id = routed(core, [CRM])
    for n in range(20):
        assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
        defer = Ending(event_id, "defer", "deferred", delay_s=n)
        assert finish(core, "w1", defer) == "ok"
        core.sweep(limit=100, batch_max=1, now_s=later(n + 1))

    pair = core.states(event_id)[CRM[0]]
    assert (pair.attempt, pair.starts, pair.state) == (1, 0, "queued")


def test_the_body_leaves_when_every_pair_is_final_and_stays_for_a_dead_letter(
    db: redis.Redis, core: PairStore
) -> None:
    event_id = routed(core, [CRM, ("notify.email", "notify")])
    assert start(core, CRM[0], [event_id], "w1", CRM[1]) == ["run"]
    assert finish(core, "w1", Ending(event_id, "done", "ok")) == "ok"
    assert db.exists(f"calhook:body:{event_id}")  # notify.email is still open

    ending = Ending(event_id, "dead", "dead_exhausted", reason="exhausted", error="down")
    assert start(core, "notify.email", [event_id], "w1", "notify") == ["run"]
    assert core.finish("notify.email", "w1", throughput_key("notify"), [ending]) == ["ok"]

    assert db.exists(f"calhook:body:{event_id}")  # the dead letter needs it
    assert core.purge("dead", [f"{event_id}.notify.email"]) == 1
    assert not db.exists(f"calhook:body:{event_id}")
    assert db.ttl(f"calhook:ev:{event_id}") > 0


def test_the_per_queue_counts_follow_every_transition(db: redis.Redis, core: PairStore) -> None:
    event_id = routed(core, [CRM])

    def counts() -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            int(db.hget(pairs_key(s), CRM[1]) or 0) for s in ("queued", "running", "waiting")
        )

    assert counts() == (1, 0, 0)
    start(core, CRM[0], [event_id], "w1", CRM[1])
    assert counts() == (0, 1, 0)
    finish(core, "w1", Ending(event_id, "retry", "retry_scheduled", delay_s=5))
    assert counts() == (0, 0, 1)
    core.sweep(limit=100, batch_max=1, now_s=later(6))
    assert counts() == (1, 0, 0)
    core.forget([event_id])
    assert counts() == (0, 0, 0)
