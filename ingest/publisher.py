"""Asynchronous, batched writing of accepted events.

Requests hand their event to :meth:`Publisher.publish` and wait; one sender task writes everything
that is pending in one script call (``calhook/store/lua/accept.lua``), so under load many requests
share a round trip and the event loop never waits on Redis. The script deduplicates each event,
stores its body once with the state of its dispatch, and queues one dispatch message naming every
new event of the batch, atomically: either the body was new and it is stored and queued, or
nothing was written and the first event_id is returned. A request is answered only after Redis
has confirmed its write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from calhook.messages import record_from_message
from calhook.store.scripts import AsyncScripts, Clock
from ingest.acks import AckConfigError, AckRule, fit

log = logging.getLogger("calhook.ingest.publisher")


# accept.lua's flag that counts the batch in calhook:ingest:confirmed.
_COUNT_CONFIRMED = 2

# A conservative loopback/LAN throughput for the deadline's size allowance.
_BYTES_PER_S = 20 * 1024 * 1024


class PublishError(Exception):
    """Raised when Redis did not confirm an event's write; the event is not known to be durable."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One accepted event: its dedup key, its new id, and its record
    (:func:`calhook.messages.event_record`; a spool written by an older calhook holds a Celery
    message instead, which :meth:`Publisher.publish` converts)."""

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
        clock: Clock,
        dedup_ttl_s: int,
        batch_max: int,
        timeout_s: float,
        ack: AckRule | None = None,
    ) -> None:
        self._redis = redis
        self._ack = ack
        self._ack_fitted = False
        self._scripts = AsyncScripts(redis, clock)
        self._dedup_ttl_s = dedup_ttl_s
        self._batch_max = batch_max
        self._timeout_s = timeout_s
        self._pending: list[_Waiter] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0
        self.largest_batch = 0
        self.unconfirmed = 0
        self.on_batch: Callable[[int], None] | None = None

    async def start(self) -> None:
        """Check that the broker can confirm writes as asked (AckConfigError if it never can),
        then start the sender task. A broker that does not answer yet is checked later."""
        if self._ack is not None:
            try:
                await self._fit_ack()
            except AckConfigError:
                raise
            except Exception as exc:
                log.warning("cannot check the acknowledgement yet", extra={"error": repr(exc)})
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
        if event.message.startswith(b"{") and (legacy := record_from_message(event.message)):
            event = Outgoing(event.dedup_key, event.event_id, legacy)
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
            wait_s = self._ack.timeout_s * 2 if self._ack is not None else 0.0
            async with asyncio.timeout(self._timeout_s + wait_s + size / _BYTES_PER_S):
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
        keys = [event.dedup_key for event, _ in batch]
        args: list[str | bytes | int] = [self._dedup_ttl_s, 0]
        for event, _ in batch:
            args += (event.event_id, event.message)
        if self._ack is None:
            return list(await self._scripts.call("accept", args, keys))
        return await self._write_confirmed(args, keys)

    def _refused(self, exc: AckConfigError) -> PublishError:
        # Every batch spools (still 202) until the broker is fixed: say so loudly, each time.
        log.error("the broker cannot give the acknowledgement asked for", extra={"error": str(exc)})
        return PublishError(str(exc))

    async def _fit_ack(self) -> AckRule:
        assert self._ack is not None
        if not self._ack_fitted:
            self._ack = await fit(self._ack, self._redis)
            await self._scripts.load("accept")
            self._ack_fitted = True
        return self._ack

    async def _write_confirmed(
        self, args: list[str | bytes | int], keys: list[str]
    ) -> list[object]:
        # One round trip on one connection (a pipeline holds one): the write, which also counts
        # the batch (flag 2) so that the wait covers it even when the batch held only duplicates
        # (ingest/acks.py), then the wait. A script the server lost (a restart, a failover)
        # wrote nothing, so the wait returns at once and the batch is sent again after loading.
        try:
            ack = await self._fit_ack()
        except AckConfigError as exc:
            raise self._refused(exc) from None
        confirmed = [args[0], int(args[1]) | _COUNT_CONFIRMED, *args[2:]]
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            self._scripts.queue(pipe, "accept", confirmed, keys)
            for command in ack.commands():
                pipe.execute_command(*command)
            written, *replies = await pipe.execute(raise_on_error=False)
            if isinstance(written, NoScriptError) and attempt == 1:
                # A server without the script restarted or took over in a failover: what it can
                # confirm is checked again (its fsync policy may differ) before it is trusted.
                self._ack_fitted = False
                try:
                    ack = await self._fit_ack()
                except AckConfigError as exc:
                    raise self._refused(exc) from None
                continue
            for result in (written, *replies):
                if isinstance(result, Exception):
                    raise result
            missing = ack.shortfall(replies)
            if missing is not None:
                self.unconfirmed += 1
                raise PublishError(missing)
            return list(written)
        raise AssertionError("unreachable: a loaded script is found")
