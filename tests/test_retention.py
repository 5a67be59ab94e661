"""Retention: parked and dead-letter records and event trails are erased after
``CALHOOK_RETENTION_DAYS``, whether or not anyone reads or writes them again."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from calhook.constants import trail_key
from calhook.settings import load_settings
from tests.support.waiting import wait_for
from tests.support.worker import SchedulerProcess
from workers.delayed import sweep_retention
from workers.stores import DAY_S, DEAD, PARKED, RecordStore
from workers.trail import INDEX_KEY, Trail


def backdate(client: redis.Redis, index: str, member: str, days: float) -> None:
    """Make an index entry look ``days`` old, as if it had been written then."""
    client.zadd(index, {member: time.time() - days * DAY_S})


def test_a_record_expires_after_the_retention(redis_db: redis.Redis) -> None:
    RecordStore(redis_db, PARKED).put("e1", {"body": "{}"})
    RecordStore(redis_db, DEAD, retention_s=2 * DAY_S).put("e1.h", {"body": "{}"})

    assert 30 * DAY_S - 5 <= int(redis_db.ttl("calhook:parked:e1")) <= 30 * DAY_S  # the default
    assert 2 * DAY_S - 5 <= int(redis_db.ttl("calhook:dead:e1.h")) <= 2 * DAY_S


def test_a_trail_never_outlives_the_retention(redis_db: redis.Redis) -> None:
    for name, settings in (
        ("short", load_settings(trail_ttl_s=7 * DAY_S)),
        ("long", load_settings(trail_ttl_s=90 * DAY_S)),
        ("one-day", load_settings(trail_ttl_s=7 * DAY_S, retention_days=1)),
    ):
        Trail(redis_db, settings.trail_keep_s).received(name, time.time(), type="t")

    assert 7 * DAY_S - 5 <= int(redis_db.ttl(trail_key("short"))) <= 7 * DAY_S
    assert 30 * DAY_S - 5 <= int(redis_db.ttl(trail_key("long"))) <= 30 * DAY_S
    assert DAY_S - 5 <= int(redis_db.ttl(trail_key("one-day"))) <= DAY_S


def test_a_write_trims_records_past_the_retention(redis_db: redis.Redis) -> None:
    store = RecordStore(redis_db, PARKED)
    store.put("old", {"body": "{}"})
    store.put("recent", {"body": "{}"})
    backdate(redis_db, store.index_key, "old", days=31)
    backdate(redis_db, store.index_key, "recent", days=29)

    store.put("new", {"body": "{}"})

    assert store.ids() == ["recent", "new"]
    assert not redis_db.exists("calhook:parked:old")
    assert store.get("recent") is not None


def test_the_sweep_erases_every_store_past_the_retention(redis_db: redis.Redis) -> None:
    parked, dead = RecordStore(redis_db, PARKED), RecordStore(redis_db, DEAD)
    trail = Trail(redis_db, ttl_s=7 * DAY_S)
    parked.put("p1", {"body": "{}"})
    dead.put("d1.h", {"body": "{}"})
    trail.received("t1", time.time(), type="t")
    now = time.time()

    assert sweep_retention(redis_db, now + 6 * DAY_S) == 0
    assert sweep_retention(redis_db, now + 8 * DAY_S) == 1  # the trail: 7 days
    assert sweep_retention(redis_db, now + 31 * DAY_S) == 2  # the records: 30 days

    assert parked.count() == dead.count() == 0
    assert redis_db.zcard(INDEX_KEY) == 0
    assert redis_db.dbsize() == 0


def test_the_scheduler_erases_old_records_nobody_touches(
    redis_url: str, redis_db: redis.Redis, tmp_path: Path
) -> None:
    parked, dead = RecordStore(redis_db, PARKED), RecordStore(redis_db, DEAD)
    trail = Trail(redis_db, ttl_s=7 * DAY_S)
    for age_days, name in ((3, "old"), (1, "young")):
        parked.put(name, {"body": "{}"})
        dead.put(f"{name}.h", {"body": "{}"})
        trail.received(name, time.time(), type="t")
        backdate(redis_db, parked.index_key, name, age_days)
        backdate(redis_db, dead.index_key, f"{name}.h", age_days)
        backdate(redis_db, INDEX_KEY, name, age_days)

    scheduler = SchedulerProcess(redis_url, tmp_path / "scheduler.log", CALHOOK_RETENTION_DAYS="2")
    scheduler.start()
    try:
        wait_for(lambda: not redis_db.exists("calhook:parked:old"), what="the old records gone")
        wait_for(lambda: not redis_db.exists(trail_key("old")), what="the old trail gone")
    finally:
        scheduler.stop()

    assert not redis_db.exists("calhook:dead:old.h")
    assert parked.ids() == ["young"]
    assert dead.ids() == ["young.h"]
    assert redis_db.zrange(INDEX_KEY, 0, -1) == [b"young"]
    assert redis_db.exists(trail_key("young"), "calhook:parked:young", "calhook:dead:young.h") == 3
