"""Retention: parked and dead-letter records, the bodies they keep, and event trails are erased
after ``CALHOOK_RETENTION_DAYS``, whether or not anyone reads or writes them again.

Records are made through the real transitions (``tests/support/store.py``); a record is made
old by moving its index entry back, as if it had been written then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from calhook.constants import trail_key
from calhook.settings import Settings, load_settings
from calhook.store.connect import pair_store
from calhook.store.keys import BODY, DEDUP, EVENT, PREFIX, body_key, event_key
from calhook.store.pairs import Ending, PairStore
from calhook.store.records import DAY_S, DEAD, PARKED, RecordStore
from calhook.store.trail import INDEX_KEY, Trail
from tests.support.store import accept, dead_letter, end, park, route
from tests.support.waiting import wait_for
from tests.support.worker import SchedulerProcess
from workers.scheduler import sweep_retention

CRM = "crm.sync_customer"


@pytest.fixture
def db(quiet_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(quiet_url)
    yield client
    client.close()


@pytest.fixture
def store(
    db: redis.Redis, quiet_url: str, make_settings: Callable[..., Settings]
) -> Callable[..., PairStore]:
    """Pair stores on the quiet database, with the settings' timings (``retention_days``…)."""

    def make(**overrides: object) -> PairStore:
        return pair_store(db, make_settings(redis_url=quiet_url, **overrides))

    return make


def backdate(client: redis.Redis, index: str, member: str, days: float) -> None:
    """Make an index entry look ``days`` old, as if it had been written then."""
    client.zadd(index, {member: time.time() - days * DAY_S})


def ttl_days(client: redis.Redis, key: str) -> float:
    """The key's time to live in days (negative: no TTL, or no key)."""
    return int(client.ttl(key)) / DAY_S


def parked_event(pairs: PairStore, received_days_ago: float = 0) -> str:
    """An event parked as dispatch parks one; its id (the record's id too)."""
    event_id = accept(pairs, b'{"type": "invoice.paid"}', received_at=_ago(received_days_ago))
    park(pairs, event_id, event_type="invoice.paid")
    return event_id


def dead_event(pairs: PairStore, received_days_ago: float = 0) -> str:
    """An event whose one handler failed for good; its id (the record is ``<id>.<handler>``)."""
    event_id = accept(pairs, b'{"type": "customer.updated"}', received_at=_ago(received_days_ago))
    dead_letter(pairs, event_id, CRM, "crm")
    return event_id


def _ago(days: float) -> float:
    return time.time() - days * DAY_S


def test_a_record_and_the_body_it_keeps_expire_after_the_retention(
    db: redis.Redis, store: Callable[..., PairStore]
) -> None:
    parked = parked_event(store())  # the default retention: 30 days
    dead = dead_event(store(retention_days=2))

    for key in (f"calhook:parked:{parked}", body_key(parked), event_key(parked)):
        assert 30 - 0.001 <= ttl_days(db, key) <= 30, key
    for key in (f"calhook:dead:{dead}.{CRM}", body_key(dead), event_key(dead)):
        assert 2 - 0.001 <= ttl_days(db, key) <= 2, key


def test_a_trail_never_outlives_the_retention(
    db: redis.Redis, store: Callable[..., PairStore]
) -> None:
    for name, settings in (
        ("short", load_settings(trail_ttl_s=7 * DAY_S)),
        ("long", load_settings(trail_ttl_s=90 * DAY_S)),
        ("one-day", load_settings(trail_ttl_s=7 * DAY_S, retention_days=1)),
    ):
        Trail(db, settings.trail_keep_s).received(name, time.time(), type="t")
    # The trail the transitions write (received, parked) takes the same TTL.
    parked = parked_event(store(trail_ttl_s=7 * DAY_S, retention_days=1))

    assert 7 - 0.001 <= ttl_days(db, trail_key("short")) <= 7
    assert 30 - 0.001 <= ttl_days(db, trail_key("long")) <= 30
    assert 1 - 0.001 <= ttl_days(db, trail_key("one-day")) <= 1
    assert 1 - 0.001 <= ttl_days(db, trail_key(parked)) <= 1


def test_trimming_removes_old_records_and_the_body_goes_with_the_last_that_needed_it(
    db: redis.Redis, store: Callable[..., PairStore]
) -> None:
    pairs = store()
    # Given: an event whose two handlers both failed for good, a month apart, and two events
    # parked a month apart.
    event_id = accept(pairs, b'{"type": "customer.updated"}')
    route(pairs, event_id, [(CRM, "crm"), ("notify.mail", "notify")])
    for handler, queue in ((CRM, "crm"), ("notify.mail", "notify")):
        ending = Ending(event_id, "dead", "dead_permanent", reason="permanent", error="Boom: no")
        assert end(pairs, handler, queue, ending) == "ok"
    dead, parked = RecordStore(db, DEAD), RecordStore(db, PARKED)
    backdate(db, dead.index_key, f"{event_id}.{CRM}", days=31)
    backdate(db, dead.index_key, f"{event_id}.notify.mail", days=29)
    old, recent = parked_event(pairs), parked_event(pairs)
    backdate(db, parked.index_key, old, days=31)
    backdate(db, parked.index_key, recent, days=29)

    # When the records past 30 days are trimmed.
    assert dead.trim(pairs, 30 * DAY_S) == 1
    assert parked.trim(pairs, 30 * DAY_S) == 1

    # Then: the old records are gone; the body stays while a record still needs it.
    assert dead.ids() == [f"{event_id}.notify.mail"]
    assert not db.exists(dead.key(f"{event_id}.{CRM}"))
    assert dead.get(f"{event_id}.notify.mail") is not None
    assert db.get(body_key(event_id)) == b'{"type": "customer.updated"}'
    assert parked.ids() == [recent]
    assert db.exists(parked.key(old), body_key(old)) == 0
    assert db.exists(parked.key(recent), body_key(recent)) == 2

    # When the last record of the event is past the retention too, its body goes with it,
    # and what is left of the event (its state, no personal data) expires by itself.
    assert dead.trim(pairs, 30 * DAY_S, now=time.time() + 2 * DAY_S) == 1
    assert dead.count() == 0
    assert not db.exists(body_key(event_id))
    assert 0 < int(db.ttl(event_key(event_id))) <= 7 * DAY_S


def test_the_sweep_erases_every_store_past_the_retention(
    db: redis.Redis, quiet_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(redis_url=quiet_url, trail_ttl_s=7 * DAY_S)
    pairs = pair_store(db, settings)
    parked, dead = parked_event(pairs), dead_event(pairs)
    now = time.time()

    assert sweep_retention(pairs, settings, now + 6 * DAY_S) == 0
    assert sweep_retention(pairs, settings, now + 8 * DAY_S) == 2  # the trails: 7 days
    assert sweep_retention(pairs, settings, now + 31 * DAY_S) == 2  # the records: 30 days

    assert RecordStore(db, PARKED).count() == RecordStore(db, DEAD).count() == 0
    assert db.zcard(INDEX_KEY) == 0
    # Nothing of either event is left but its state (ids, times, types, counts), which expires
    # by itself, and its dedup key, which does too; the rest is the fleet's counters and the
    # messages no worker took in this test.
    keys = {k.decode() for k in db.scan_iter(count=1000)}
    per_event = {k for k in keys if k.startswith((EVENT, BODY, DEDUP, PREFIX + "trail:"))}
    assert per_event == {k for k in keys if k.startswith((EVENT, DEDUP))}
    assert {event_key(parked), event_key(dead)} <= per_event
    for key in per_event:
        assert 0 < int(db.ttl(key)) <= 7 * DAY_S, key
    assert not any(k.startswith((f"{PREFIX}parked:", f"{PREFIX}dead:")) for k in keys)


def test_the_scheduler_erases_old_records_nobody_touches(
    quiet_url: str, db: redis.Redis, store: Callable[..., PairStore], tmp_path: Path
) -> None:
    pairs = store()
    # Given: a parked event and a dead letter received 3 days ago, and two received yesterday.
    parked_store, dead_store = RecordStore(db, PARKED), RecordStore(db, DEAD)
    events: dict[str, tuple[str, str]] = {}
    for age_days, name in ((3, "old"), (1, "young")):
        parked, dead = parked_event(pairs, age_days), dead_event(pairs, age_days)
        backdate(db, parked_store.index_key, parked, age_days)
        backdate(db, dead_store.index_key, f"{dead}.{CRM}", age_days)
        events[name] = (parked, dead)
    (old_parked, old_dead), (young_parked, young_dead) = events["old"], events["young"]

    # When the scheduler runs with a retention of 2 days.
    scheduler = SchedulerProcess(quiet_url, tmp_path / "scheduler.log", CALHOOK_RETENTION_DAYS="2")
    scheduler.start()
    try:
        wait_for(lambda: not db.exists(parked_store.key(old_parked)), what="old records gone")
        wait_for(lambda: not db.exists(trail_key(old_parked)), what="the old trail gone")
    finally:
        scheduler.stop()

    # Then: the old records, their bodies and trails are gone; the young ones are all there.
    assert not db.exists(dead_store.key(f"{old_dead}.{CRM}"))
    assert parked_store.ids() == [young_parked]
    assert dead_store.ids() == [f"{young_dead}.{CRM}"]
    indexed: list[bytes] = db.zrange(INDEX_KEY, 0, -1)  # type: ignore[assignment]
    assert {m.decode() for m in indexed} == {young_parked, young_dead}
    for gone in (old_parked, old_dead):
        assert db.exists(body_key(gone), trail_key(gone)) == 0, gone
    for kept in (young_parked, young_dead):
        assert db.exists(body_key(kept), trail_key(kept)) == 2, kept
