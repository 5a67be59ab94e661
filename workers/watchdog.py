"""The watchdog: a message lost between Redis and a worker is queued again.

Celery's Redis transport takes a message off its queue (``BRPOP``) and only then records it as
unacked, in a second command. A connection lost between the two (a Redis restart, a network
blip) loses the message: neither the queue nor the unacked hash holds it. The soak test caught
exactly that. So every message calhook queues (an event's dispatch, each (event, handler) task)
also gets a watchdog entry: a copy, due ``CALHOOK_WATCHDOG_S`` later, written in the same Lua
script as the message itself. Finishing the work (fan-out, park, a final ledger outcome)
cancels the entry; a retry moves it past the retry's due time. An entry that comes due is queued
again by the scheduler and re-armed. A copy that turns out not to have been lost is harmless:
the fan-out marker and the ledger make its second run a no-op.
"""

from __future__ import annotations

import logging

import redis

from calhook.constants import WATCHDOG_KEY, WATCHDOG_MESSAGES_KEY

log = logging.getLogger("calhook.scheduler")

# KEYS[1] due set, KEYS[2] messages; ARGV[1] now (ms), ARGV[2] re-arm after (ms), ARGV[3] most.
# Entries are "<queue>\n<message>", like the delayed store's.
_FIRE_DUE_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  if entry then
    local sep = string.find(entry, '\\n', 1, true)
    redis.call('LPUSH', string.sub(entry, 1, sep - 1), string.sub(entry, sep + 1))
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return ids
"""


def entry(queue: str, message: bytes) -> bytes:
    """A watchdog (or delayed-store) entry: the queue, a newline, the message."""
    return queue.encode() + b"\n" + message


class Watchdog:
    """Watchdog entries of queued calhook messages."""

    def __init__(self, client: redis.Redis, watchdog_s: float) -> None:
        self._redis = client
        self._after_ms = int(watchdog_s * 1000)
        self._fire_due = client.register_script(_FIRE_DUE_LUA)

    def arm(
        self,
        member: str,
        queue: str,
        message: bytes,
        not_before_s: float,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Watch ``message`` on ``queue``: due ``CALHOOK_WATCHDOG_S`` after ``not_before_s``."""
        target = pipe if pipe is not None else self._redis
        target.hset(WATCHDOG_MESSAGES_KEY, member, entry(queue, message))
        target.zadd(WATCHDOG_KEY, {member: int(not_before_s * 1000) + self._after_ms})

    def fire_due(self, now_s: float, limit: int = 500) -> list[str]:
        """Queue again every entry that is due, re-armed; return their ids."""
        fired: list[bytes] = self._fire_due(
            keys=[WATCHDOG_KEY, WATCHDOG_MESSAGES_KEY],
            args=[int(now_s * 1000), self._after_ms, limit],
        )
        return [member.decode() for member in fired]

    def depth(self) -> int:
        """How many queued messages are being watched."""
        return int(self._redis.zcard(WATCHDOG_KEY))


def cancel(target: redis.Redis | redis.client.Pipeline, member: str) -> None:
    """Stop watching ``member``: its work finished (queue it on ``target``, a pipeline or not)."""
    target.zrem(WATCHDOG_KEY, member)
    target.hdel(WATCHDOG_MESSAGES_KEY, member)
