"""Making an event durable: Redis first, the local spool when Redis fails, and back.

Normally events go to Redis through the :class:`~ingest.publisher.Publisher`. When a write fails
or misses its deadline (``CALHOOK_REDIS_TIMEOUT_S``, well under a second), the event is appended
to the spool instead, fsynced before the answer, and the writer switches to *spooling*: every
event goes to the spool until the drainer has moved all of it to Redis, appends still being
fsynced included, so acknowledged order is kept and a sick Redis is not hammered. The drainer
resends through the same dedup-and-enqueue script, so an event whose first write did reach Redis
(a timeout is not a refusal) is not queued twice.

Only when Redis and the spool both fail is an event refused (503).

When spooling ends, one operational notice tells how many events waited and for how long
(``ingress_spooled`` in ``calhook:notices``, sent by :mod:`workers.notices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from calhook.constants import trail_key
from calhook.store.keys import NOTICES, NOTICES_MAX
from ingest.publisher import Outgoing, Publisher, PublishError
from ingest.spool import Spool, SpoolError

log = logging.getLogger("calhook.ingest.durable")

# Events per drain round trip: small enough that a batch of large bodies meets its deadline.
_DRAIN_BATCH = 64


class NotDurable(Exception):
    """Raised when neither Redis nor the spool took the event."""


class DurableWriter:
    """Writes events to Redis or, failing that, to the spool; drains the spool back."""

    def __init__(
        self,
        redis: Redis,
        publisher: Publisher,
        spool: Spool,
        *,
        retry_interval_s: float = 0.5,
        trail_ttl_s: int = 7 * 86_400,
    ) -> None:
        self._trail_ttl_s = trail_ttl_s
        self._redis = redis
        self._publisher = publisher
        self._spool = spool
        self._retry_interval_s = retry_interval_s
        self._spooling = False
        self._wake = asyncio.Event()
        self._closing = False
        self._drainer: asyncio.Task[None] | None = None
        self.spooled = 0
        self.drained = 0
        # The current spell of spooling: since when, and the spooled count when it began.
        self._spell: tuple[float, int] | None = None

    @property
    def spooling(self) -> bool:
        """True while new events go to the spool."""
        return self._spooling

    def spool_depth(self) -> int:
        """Events in this process's spool, not yet in Redis."""
        return self._spool.depth()

    async def start(self) -> None:
        """Open the spool (recovering what a crashed predecessor left) and start the drainer."""
        await self._spool.open()
        if self._spool.depth():
            log.warning("spool holds events from before", extra={"depth": self._spool.depth()})
            self._spooling = True
            self._spell = (time.time(), -self._spool.depth())
            self._wake.set()
        self._drainer = asyncio.create_task(self._drain_forever(), name="calhook-spool-drainer")

    async def close(self) -> None:
        """Stop draining; flush pending Redis writes and spool appends. Leftovers stay on disk."""
        self._closing = True
        self._wake.set()
        if self._drainer is not None:
            # Let a batch in flight finish (its offset gets committed), then stop.
            await self._drainer
        await self._publisher.close()
        await self._spool.close()

    async def write(self, event: Outgoing) -> str | None:
        """Make ``event`` durable; return the first event_id if Redis knew it as a duplicate.

        ``spooled`` counts the events that went to the spool instead of Redis.
        """
        if not self._spooling:
            try:
                return await self._publisher.publish(event)
            except PublishError as exc:
                if not self._spooling:
                    log.warning("redis unavailable, spooling", extra={"error": str(exc)})
                    self._spooling = True
                    self._spell = (time.time(), self.spooled)
                    self._wake.set()
        # append() counts the event in the spool's depth before its first await, so from the
        # moment it is chosen for the spool the drainer cannot end spooling ahead of it.
        try:
            await self._spool.append(event)
        except SpoolError as exc:
            log.error("spool unavailable", extra={"error": str(exc)})
            raise NotDurable(str(exc)) from exc
        finally:
            # The drainer may have kept spooling on only for this append; let it look again now
            # instead of at its next periodic wake.
            self._wake.set()
        self.spooled += 1
        return None

    async def _sink(self, batch: list[Outgoing]) -> None:
        # One pipelined round trip for the batch; a failure leaves it in the spool for next time.
        await asyncio.gather(*(self._publisher.publish(event) for event in batch))
        # Tell the events' trails (calhook events show) that they waited in the spool.
        drained_at = time.time()
        entry = orjson.dumps({"at": drained_at, "what": "spooled", "drained_at": drained_at})
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in batch:
                pipe.rpush(trail_key(event.event_id), entry)
                pipe.expire(trail_key(event.event_id), self._trail_ttl_s)
            await pipe.execute()

    async def _drain_forever(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation of a
        # task whose wait completes at the same moment, and the loop would never end.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retry_interval_s * 10):
                    await self._wake.wait()
            self._wake.clear()
            while not self._closing:
                try:
                    await self._drain_once()
                except (PublishError, RedisError, OSError, TimeoutError) as exc:
                    log.info("spool drain waits for redis", extra={"error": repr(exc)})
                except Exception:
                    # A disk error (or a bug) must not end draining for good; try again later.
                    log.exception("spool drain failed")
                else:
                    break
                await self._sleep(self._retry_interval_s)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when closing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self._closing:
                    await self._wake.wait()
                    self._wake.clear()

    async def _drain_once(self) -> None:
        await self._redis.ping()
        moved = await self._spool.drain(self._sink, batch_max=_DRAIN_BATCH)
        moved += await self._spool.drain_orphans(self._sink, batch_max=_DRAIN_BATCH)
        if moved:
            self.drained += moved
            log.info("spool drained", extra={"moved": moved, "depth": self._spool.depth()})
        # depth() counts appends still being fsynced: ending spooling while one is, would let
        # later events reach Redis directly before it is drained, out of acknowledged order.
        # No await between the check and the switch: no append can slip in between.
        if self._spooling and self._spool.depth() == 0:
            self._spooling = False
            log.info("redis is back, spooling ends")
            await self._tell_spooled()

    async def _tell_spooled(self) -> None:
        """One operational notice per spell of spooling, now that Redis answers (best effort:
        a notice lost here loses no event)."""
        if self._spell is None:
            return
        since, at_start = self._spell
        self._spell = None
        now, host = time.time(), socket.gethostname()
        spooled = self.spooled - at_start
        text = (f"ingress {host}: {spooled} events waited in its spool for {now - since:.0f} s "
                "(Redis unavailable or too slow to confirm); all are in Redis now")  # fmt: skip
        data = {"host": host, "spooled": spooled, "since": since, "until": now}
        fields: dict[Any, Any] = {
            "kind": "ingress_spooled", "subject": host, "text": text, "at": f"{now:.3f}",
            "data": orjson.dumps(data)}  # fmt: skip
        try:
            await self._redis.xadd(NOTICES, fields, maxlen=NOTICES_MAX, approximate=True)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("cannot write the spooling notice", extra={"error": repr(exc)})
