"""``calhook scheduler``: the one sweep that queues what is due, expired or lost.

Retries, pairs waiting for a lock or a rate limit, runs whose worker died (their lease ran out)
and messages lost between Redis and a worker all live in the pair states, each with a time in
one sorted set. Every ``CALHOOK_SCHEDULER_INTERVAL_S`` the sweep (``store/lua/sweep.lua``) looks
at those whose time has come and queues one message for each that needs one; a pair whose
message is still pending gets none, so a backlog or a stopped scheduler never piles up copies.
Several schedulers may run: each sweep is one atomic script.

Each tick it also runs the release (:mod:`calhook.store.health`): an open breaker's probe, and the
held events of a resumed handler, oldest first at its pace.

It also starts the operational notices (:mod:`workers.notices`) in a thread of their own, so a
slow receiver never delays a sweep, and each tick it writes a notice when the dead letters cross
CALHOOK_NOTICE_DEAD_LETTERS.

Once a minute (and at start) it also enforces the retention (``CALHOOK_RETENTION_DAYS``): dead
letters, parked records and trails older than it are erased even if nothing is written or read
any more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from calhook.settings import Settings
from calhook.store.health import Health, Released
from calhook.store.pairs import PairStore
from calhook.store.records import DEAD, PARKED, RecordStore
from calhook.store.trail import Trail
from workers.legacy import migrate_stores
from workers.notices import check_dead_letters, start_notices

log = logging.getLogger("calhook.scheduler")

# Records expire by their own TTL; the sweep only keeps indexes tidy, so once a minute is plenty.
RETENTION_SWEEP_S = 60.0
_SWEEP_LIMIT = 1000
# Held events one release queues per handler at most, whatever the pace.
_RELEASE_MOST = 1000
# How long a stopping scheduler waits for a notice being sent; one cut short is sent again by
# the next scheduler to read the stream (the channels that took it are not sent to again).
_NOTICES_STOP_S = 5.0


def sweep_retention(pairs: PairStore, settings: Settings, now_s: float | None = None) -> int:
    """Erase dead letters, parked records and trails past the retention; return how many."""
    now = time.time() if now_s is None else now_s
    client = pairs.client
    erased = RecordStore(client, PARKED).trim(pairs, settings.retention_s, now)
    erased += RecordStore(client, DEAD).trim(pairs, settings.retention_s, now)
    return erased + Trail(client, settings.trail_keep_s).trim(now)


def sweep_once(pairs: PairStore, settings: Settings, now_s: float | None = None) -> int:
    """Sweep until nothing more is due; return how many pairs were queued."""
    queued = 0
    while True:
        swept = pairs.sweep(
            limit=_SWEEP_LIMIT,
            batch_max=settings.batch_max,
            hold_s=settings.task_time_limit_s + settings.recovery_s,
            now_s=now_s,
        )
        queued += swept.queued
        if swept.due:
            log.info("due", extra={"queued": swept.due})
        if swept.expired or swept.lost:
            log.warning(
                "recovered",
                extra={
                    "expired": swept.expired,
                    "lost": swept.lost,
                    "pairs": list(swept.recovered[:50]),
                },
            )
        if swept.looked_at < _SWEEP_LIMIT:
            return queued


def release_once(health: Health, settings: Settings) -> Released:
    """Let the probes of open breakers through, and queue the held events of resumed handlers
    at their pace (``lua/release.lua``)."""
    released = health.release(
        rate_per_s=settings.release_rate_per_s,
        most=_RELEASE_MOST,
        batch_max=settings.batch_max,
        tick_s=settings.scheduler_interval_s,
    )
    for circuit, pair in released.probes:
        log.info("breaker probe", extra={"circuit": circuit, "pair": pair})
    for handler, n, left in released.released:
        log.info("released held events", extra={"handler": handler, "queued": n, "left": left})
    return released


def _step(name: str, fn: Callable[..., object], *args: object) -> bool:
    """Run one step of a tick; log and carry on if it fails. True if it ran."""
    try:
        fn(*args)
    except redis.ConnectionError as exc:
        log.warning("scheduler cannot reach redis", extra={"step": name, "error": repr(exc)})
    except redis.RedisError as exc:
        log.error("scheduler step failed", extra={"step": name, "error": repr(exc)})
    else:
        return True
    return False


def run_scheduler(pairs: PairStore, settings: Settings, stop: threading.Event) -> None:
    """Sweep every ``CALHOOK_SCHEDULER_INTERVAL_S`` until ``stop`` is set; every minute (and at
    start), erase what is past the retention. Redis errors are waited out."""
    log.info("scheduler started", extra={"interval_s": settings.scheduler_interval_s})
    try:
        migrate_stores(pairs.client)
    except redis.RedisError as exc:
        log.warning("cannot look for calhook 0.1's delayed store", extra={"error": repr(exc)})
    next_retention = 0.0
    health = Health(pairs.scripts)
    notices = start_notices(pairs.client, settings, stop)
    while not stop.is_set():
        if time.monotonic() >= next_retention and _step(
            "retention", sweep_retention, pairs, settings
        ):
            next_retention = time.monotonic() + RETENTION_SWEEP_S
        # Each step on its own: one that fails (Redis away, a script refused) holds up no other.
        _step("sweep", sweep_once, pairs, settings)
        _step("release", release_once, health, settings)
        _step(
            "dead-letter threshold", check_dead_letters, pairs.client, settings.notice_dead_letters
        )
        if notices is not None and not notices.is_alive() and not stop.is_set():
            log.error("the notices thread ended; starting it again")
            notices = start_notices(pairs.client, settings, stop)
        stop.wait(settings.scheduler_interval_s)
    if notices is not None:
        notices.join(_NOTICES_STOP_S)
    log.info("scheduler stopped")
