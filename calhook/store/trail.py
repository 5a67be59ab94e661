"""The story of each event, kept in Redis for ``CALHOOK_TRAIL_TTL_S``: ``calhook events``.

Never longer than ``CALHOOK_RETENTION_DAYS``: the TTL is the smaller of the two, so lowering the
retention shortens trails too, without a second setting to keep in step.

One list per event of small JSON entries (received, dispatched or parked, every handler
attempt's outcome, retries and their due time), and one index of events by arrival, so ops can
find an event by type and time and read what happened to it without grepping logs. Entries carry
ids, types, outcomes and error class names, never personal data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis

from calhook.store.keys import TRAIL_INDEX, trail_key

INDEX_KEY = TRAIL_INDEX
_TRIM_BATCH = 500


class Trail:
    """Appends to and reads event trails."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        """``ttl_s``: how long a trail is kept, ``Settings.trail_keep_s`` (never past the
        retention)."""
        self._redis = client
        self.ttl_s = ttl_s

    def trim(self, now: float | None = None) -> int:
        """Erase the trails of events that arrived more than the TTL before ``now``.

        Their lists expire by themselves; this drops their index entries, and lists whose TTL
        was longer when they were written. Returns how many events were dropped.
        """
        cutoff = (time.time() if now is None else now) - self.ttl_s
        erased = 0
        while True:
            old: list[bytes] = self._redis.zrangebyscore(  # type: ignore[assignment]
                INDEX_KEY, "-inf", cutoff, start=0, num=_TRIM_BATCH
            )
            if not old:
                return erased
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(trail_key(i.decode()) for i in old))
                pipe.zrem(INDEX_KEY, *old)
                pipe.execute()
            erased += len(old)

    def received(self, event_id: str, received_at: float, **fields: Any) -> None:
        """Start an event's trail and index it by arrival; see :meth:`received_to`."""
        with self._redis.pipeline(transaction=False) as pipe:
            self.received_to(pipe, event_id, received_at, **fields)
            pipe.execute()

    def received_to(
        self, pipe: redis.client.Pipeline, event_id: str, received_at: float, **fields: Any
    ) -> None:
        """Queue on ``pipe`` the start of an event's trail and its index entry; forget index
        entries past the TTL."""
        entry = orjson.dumps({"at": received_at, "what": "received", **fields})
        pipe.rpush(trail_key(event_id), entry)
        pipe.expire(trail_key(event_id), self.ttl_s)
        pipe.zadd(INDEX_KEY, {event_id: received_at})
        pipe.zremrangebyscore(INDEX_KEY, "-inf", time.time() - self.ttl_s)

    def read(self, event_id: str) -> list[dict[str, Any]]:
        """The event's entries, oldest first (empty if unknown or expired)."""
        raw: list[bytes] = self._redis.lrange(trail_key(event_id), 0, -1)  # type: ignore[assignment]
        return [orjson.loads(entry) for entry in raw]

    def events(
        self,
        *,
        since: float = 0.0,
        until: float | None = None,
        event_type: str | None = None,
        limit: int = 50,
    ) -> Iterator[dict[str, Any]]:
        """The ``received`` entries of events that arrived between ``since`` and ``until``,
        newest first."""
        found = 0
        offset = 0
        top = "+inf" if until is None else repr(until)
        while found < limit:
            ids: list[bytes] = self._redis.zrevrangebyscore(  # type: ignore[assignment]
                INDEX_KEY, top, since, start=offset, num=200
            )
            if not ids:
                return
            offset += len(ids)
            with self._redis.pipeline(transaction=False) as pipe:
                for event_id in ids:
                    pipe.lindex(trail_key(event_id.decode()), 0)
                firsts = pipe.execute()
            for event_id, first in zip(ids, firsts, strict=True):
                if first is None:
                    continue
                entry = orjson.loads(first)
                if event_type is None or entry.get("type") == event_type:
                    found += 1
                    yield {"event_id": event_id.decode(), **entry}
                    if found >= limit:
                        return
