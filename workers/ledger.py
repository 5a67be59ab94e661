"""The idempotency ledger: what each (event, handler) came to, and how often a message arrived.

Celery on Redis delivers at least once. The ledger makes effects effectively once: a handler
whose effect completed is never run again for that event, whatever is redelivered; one that
crashed midway has no entry and runs again (it should pass ``ctx.idempotency_key`` to the systems
it calls, so that repeat is harmless too). The delivery counter catches a message that keeps
killing its worker (late ack + reject-on-worker-lost would loop forever, celery#9082).
"""

from __future__ import annotations

import enum

import redis

from calhook.constants import KEY_PREFIX, pair_id
from workers.watchdog import cancel


class Outcome(enum.StrEnum):
    """How an (event, handler) ended."""

    DONE = "done"
    SKIPPED_STALE = "skipped_stale"
    DEAD = "dead"


FINAL = frozenset(Outcome)


def ledger_key(event_id: str) -> str:
    """The hash of one event's handler outcomes."""
    return f"{KEY_PREFIX}ledger:{event_id}"


def deliveries_key(event_id: str) -> str:
    """The hash counting deliveries per handler and attempt of one event."""
    return f"{KEY_PREFIX}deliveries:{event_id}"


class Ledger:
    """Outcomes and delivery counts, kept for ``ttl_s``."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s

    def outcome(self, event_id: str, handler: str) -> Outcome | None:
        """The final outcome recorded for the pair, if any."""
        raw = self._redis.hget(ledger_key(event_id), handler)
        return Outcome(raw.decode()) if raw else None  # type: ignore[union-attr]

    def begin(self, event_id: str, handler: str, attempt: int) -> tuple[Outcome | None, int]:
        """At the start of a delivery, in one round trip: the pair's final outcome if it has
        one, and the delivery count of this attempt, this one included."""
        key = deliveries_key(event_id)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(ledger_key(event_id), handler)
            pipe.hincrby(key, f"{handler}#{attempt}", 1)
            pipe.expire(key, self._ttl_s)
            raw, count, _ = pipe.execute()
        return (Outcome(raw.decode()) if raw else None), int(count)

    def record(self, event_id: str, handler: str, outcome: Outcome) -> None:
        """Record the final outcome of the pair; see :meth:`record_to`."""
        with self._redis.pipeline(transaction=True) as pipe:
            self.record_to(pipe, event_id, handler, outcome)
            pipe.execute()

    def record_to(
        self, pipe: redis.client.Pipeline, event_id: str, handler: str, outcome: Outcome
    ) -> None:
        """Queue on ``pipe`` the final outcome of the pair, its count for audits, and the stop of
        the pair's watchdog: its work is over, whatever the outcome."""
        key = ledger_key(event_id)
        pipe.hset(key, handler, outcome.value)
        pipe.hincrby(key, f"{handler}#{outcome.value}", 1)
        pipe.expire(key, self._ttl_s)
        cancel(pipe, pair_id(event_id, handler))

    def forget(self, event_id: str, handler: str, pipe: redis.client.Pipeline) -> None:
        """Queue on ``pipe`` the removal of the pair's outcome and counts, so a replay runs it."""
        counted: list[bytes] = self._redis.hkeys(deliveries_key(event_id))  # type: ignore[assignment]
        mine = [f for f in counted if f.decode().rpartition("#")[0] == handler]
        pipe.hdel(ledger_key(event_id), handler)
        if mine:
            pipe.hdel(deliveries_key(event_id), *mine)

    def count_delivery(self, event_id: str, handler: str, attempt: int) -> int:
        """Count one more delivery of the pair's ``attempt``; return the count so far."""
        key = deliveries_key(event_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, f"{handler}#{attempt}", 1)
            pipe.expire(key, self._ttl_s)
            count, _ = pipe.execute()
        return int(count)
