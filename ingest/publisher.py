"""Asynchronous, batched publishing of accepted events onto the dispatch queue.

Requests hand their event to :meth:`Publisher.publish` and wait; one sender task writes everything
that is pending in one script call, so under load many requests share a round trip and
the event loop never waits on Redis. Each event is deduplicated and enqueued by one Lua script,
atomically: either the body was new and its message is on the queue, or nothing was written and
the first event_id is returned. A request is answered only after Redis has confirmed its write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from calhook.constants import WATCHDOG_KEY, WATCHDOG_MESSAGES_KEY

log = logging.getLogger("calhook.ingest.publisher")

# One script call writes a whole batch. KEYS[1] queue, KEYS[2] watchdog set, KEYS[3] watchdog
# messages, KEYS[3 + i] the i-th event's dedup key; ARGV[1] dedup ttl (s), ARGV[2] watchdog due
# (ms), ARGV[1 + 2i] the i-th event_id, ARGV[2 + 2i] its message. Returns one entry per event:
# the first event_id of a body already seen, or false (nil) once the message is queued (and
# watched: see workers/watchdog.py). A body twice in one batch is a duplicate of itself.
# If Redis refuses the script (out of memory), it does so at the first write: nothing is written.
_ENQUEUE_LUA = """
local results = {}
for i = 4, #KEYS do
  local id = ARGV[2 * i - 5]
  local message = ARGV[2 * i - 4]
  local first = redis.call('GET', KEYS[i])
  if first and first ~= id then
    results[#results + 1] = first
  else
    -- Our own id means a retry of a batch that had already been written.
    if not first then
      redis.call('SET', KEYS[i], id, 'EX', ARGV[1])
      redis.call('LPUSH', KEYS[1], message)
      redis.call('ZADD', KEYS[2], ARGV[2], id)
      redis.call('HSET', KEYS[3], id, KEYS[1] .. '\\n' .. message)
    end
    results[#results + 1] = false
  end
end
return results
"""


# A conservative loopback/LAN throughput for the deadline's size allowance.
_BYTES_PER_S = 20 * 1024 * 1024


class PublishError(Exception):
    """Raised when Redis did not confirm an event's write; the event is not known to be durable."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One accepted event: its dedup key, its new id, and the Celery message to queue."""

    dedup_key: str
    event_id: str
    message: bytes


_Waiter = tuple[Outgoing, "asyncio.Future[str | None]"]


class Publisher:
    """Writes events to Redis in batches, one script call each; see the module docstring."""

    def __init__(
        self,
        redis: Redis,
        *,
        queue: str,
        dedup_ttl_s: int,
        batch_max: int,
        timeout_s: float,
        watchdog_s: float,
    ) -> None:
        self._redis = redis
        self._watchdog_ms = int(watchdog_s * 1000)
        self._queue = queue
        self._dedup_ttl_s = dedup_ttl_s
        self._batch_max = batch_max
        self._timeout_s = timeout_s
        self._pending: list[_Waiter] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._sender: asyncio.Task[None] | None = None
        self._sha: str | None = None
        self.batches = 0
        self.largest_batch = 0
        self.on_batch: Callable[[int], None] | None = None

    async def start(self) -> None:
        """Start the sender task."""
        self._sender = asyncio.create_task(self._run(), name="calhook-publisher")

    async def close(self) -> None:
        """Write whatever is still pending, then stop; later publishes fail."""
        self._closing = True
        self._wake.set()
        if self._sender is not None:
            await self._sender

    async def publish(self, event: Outgoing) -> str | None:
        """Make ``event`` durable. Return None when queued, or the first id of a duplicate."""
        if self._closing:
            raise PublishError("the ingress is shutting down")
        if self._sender is None or self._sender.done():
            raise PublishError("the publisher is not running")
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self._batch_max]
                del self._pending[: self._batch_max]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[_Waiter]) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch))
        size = sum(len(event.message) for event, _ in batch)
        try:
            # The deadline allows for the bytes to move: a batch of large bodies is not a sign
            # of a sick Redis.
            async with asyncio.timeout(self._timeout_s + size / _BYTES_PER_S):
                results = await self._write(batch)
        except Exception as exc:
            # Whatever went wrong, this batch is not known to be durable; the sender lives on.
            log.warning("redis write failed", extra={"batch": len(batch), "error": repr(exc)})
            for _, future in batch:
                if not future.done():
                    future.set_exception(PublishError(f"redis write failed: {exc!r}"))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result.decode() if isinstance(result, bytes) else None)

    async def _write(self, batch: list[_Waiter]) -> list[object]:
        if self._sha is None:
            self._sha = await self._redis.script_load(_ENQUEUE_LUA)
        keys = [self._queue, WATCHDOG_KEY, WATCHDOG_MESSAGES_KEY]
        keys += [event.dedup_key for event, _ in batch]
        args: list[str | bytes | int] = [
            self._dedup_ttl_s,
            int(time.time() * 1000) + self._watchdog_ms,
        ]
        for event, _ in batch:
            args += (event.event_id, event.message)
        try:
            results = await self._redis.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or its script cache was flushed; NOSCRIPT means nothing ran.
            self._sha = await self._redis.script_load(_ENQUEUE_LUA)
            results = await self._redis.evalsha(self._sha, len(keys), *keys, *args)
        return list(results)
