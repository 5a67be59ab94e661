"""Asynchronous, batched publishing of accepted events onto the dispatch queue.

Requests hand their event to :meth:`Publisher.publish` and wait; one sender task writes everything
that is pending in one pipelined round trip, so under load many requests share a round trip and
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

# KEYS[1] dedup key, KEYS[2] queue, KEYS[3] watchdog set, KEYS[4] watchdog messages;
# ARGV[1] event_id, ARGV[2] message, ARGV[3] dedup ttl (s), ARGV[4] watchdog due (ms).
# Returns the first event_id for a body already seen, else nil once the message is queued (and
# watched: see workers/watchdog.py).
_ENQUEUE_LUA = """
local first = redis.call('GET', KEYS[1])
if first then
  -- Our own id: a client retry of a write that had already succeeded.
  if first == ARGV[1] then return false end
  return first
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], KEYS[2] .. '\\n' .. ARGV[2])
return false
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
    """Writes events to Redis in pipelined batches; see the module docstring."""

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
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(PublishError(f"redis refused the write: {result}"))
            else:
                future.set_result(result.decode() if isinstance(result, bytes) else None)

    async def _write(self, batch: list[_Waiter]) -> list[object]:
        if self._sha is None:
            self._sha = await self._redis.script_load(_ENQUEUE_LUA)
        results = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis restarted or its script cache was flushed; NOSCRIPT means nothing ran.
            self._sha = await self._redis.script_load(_ENQUEUE_LUA)
            retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            for i, result in zip(
                retry, await self._pipeline([batch[i] for i in retry]), strict=True
            ):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[_Waiter]) -> list[object]:
        due_ms = int(time.time() * 1000) + self._watchdog_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for event, _ in batch:
                pipe.evalsha(
                    self._sha,  # type: ignore[arg-type]
                    4,
                    event.dedup_key,
                    self._queue,
                    WATCHDOG_KEY,
                    WATCHDOG_MESSAGES_KEY,
                    event.event_id,
                    event.message,
                    self._dedup_ttl_s,
                    due_ms,
                )
            return list(await pipe.execute(raise_on_error=False))
