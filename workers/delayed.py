"""The delayed store: retries due later wait in Redis, not in Celery.

A Celery countdown longer than the visibility timeout runs the task again and again, and ETA tasks
sit in worker memory (RELIABILITY.md items 4 and 5). So a retry due in an hour is a member of a
sorted set scored by its due time, with its message in a hash; the scheduler moves due messages
onto their queues with one Lua script, so a message is moved exactly once even with several
schedulers running, and a restart of any process loses nothing.

The scheduler also enforces the retention (``CALHOOK_RETENTION_DAYS``) once a minute: parked and
dead-letter records and event trails older than it are erased even if nothing is written or
read any more (:func:`sweep_retention`).
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from calhook.constants import KEY_PREFIX
from calhook.settings import get_settings
from workers.stores import DEAD, PARKED, RecordStore
from workers.trail import Trail
from workers.watchdog import Watchdog, entry

log = logging.getLogger("calhook.scheduler")

DUE_KEY = f"{KEY_PREFIX}delayed"
MESSAGES_KEY = f"{KEY_PREFIX}delayed:messages"
# Records expire by their own TTL; the sweep only keeps indexes tidy, so once a minute is plenty.
RETENTION_SWEEP_S = 60.0

# KEYS[1] due set, KEYS[2] messages; ARGV[1] now (ms), ARGV[2] most to move.
# A stored entry is "<queue>\n<message>". The queue is not in KEYS: calhook needs one Redis (no
# cluster), which the broker needs anyway.
_MOVE_DUE_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  if entry then
    local sep = string.find(entry, '\\n', 1, true)
    redis.call('LPUSH', string.sub(entry, 1, sep - 1), string.sub(entry, sep + 1))
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""


class DelayedStore:
    """Messages due later, by due time."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self.client = client
        self._move_due = client.register_script(_MOVE_DUE_LUA)

    def schedule(self, member: str, queue: str, message: bytes, due_s: float) -> None:
        """Put ``message`` on ``queue`` at ``due_s`` (epoch seconds); the same member replaces."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(MESSAGES_KEY, member, entry(queue, message))
            pipe.zadd(DUE_KEY, {member: int(due_s * 1000)})
            pipe.execute()

    def move_due(self, now_s: float | None = None, limit: int = 500) -> int:
        """Move the messages due by ``now_s`` onto their queues; return how many moved."""
        now_ms = int((time.time() if now_s is None else now_s) * 1000)
        return int(self._move_due(keys=[DUE_KEY, MESSAGES_KEY], args=[now_ms, limit]))

    def depth(self) -> int:
        """How many messages wait."""
        return int(self._redis.zcard(DUE_KEY))

    def next_due(self) -> float | None:
        """Epoch seconds of the earliest due message, if any."""
        first = self._redis.zrange(DUE_KEY, 0, 0, withscores=True)
        return float(first[0][1]) / 1000 if first else None


def sweep_retention(client: redis.Redis, now_s: float | None = None) -> int:
    """Erase parked and dead-letter records and event trails past the retention; how many."""
    now = time.time() if now_s is None else now_s
    trail = Trail(client, get_settings().trail_keep_s)
    return sum(
        [RecordStore(client, PARKED).trim(now), RecordStore(client, DEAD).trim(now),
         trail.trim(now)]
    )  # fmt: skip


def run_scheduler(
    store: DelayedStore, watchdog: Watchdog, interval_s: float, stop: threading.Event
) -> None:
    """Every ``interval_s`` until ``stop`` is set: move due retries to their queues, and queue
    again what the watchdog says was lost; every minute (and at start), erase what is past the
    retention. Redis errors are waited out."""
    log.info("scheduler started", extra={"interval_s": interval_s})
    next_sweep = 0.0
    while not stop.is_set():
        try:
            if time.monotonic() >= next_sweep:
                erased = sweep_retention(store.client)
                next_sweep = time.monotonic() + RETENTION_SWEEP_S
                if erased:
                    log.info("retention: erased old records", extra={"erased": erased})
            moved = store.move_due()
            while moved:
                log.info("retries due", extra={"moved": moved})
                moved = store.move_due()
            lost = watchdog.fire_due(time.time())
            if lost:
                log.warning("watchdog queued lost messages again", extra={"ids": lost[:50]})
        except redis.RedisError as exc:
            log.warning("scheduler cannot reach redis", extra={"error": repr(exc)})
        stop.wait(interval_s)
    log.info("scheduler stopped")
