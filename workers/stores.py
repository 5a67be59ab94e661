"""Where events that could not be handled wait for people: the parked and dead-letter stores.

*Parked*: events dispatch could not route (unknown type, planned type without a handler, a
payload that fails its schema). *Dead letters*: (event, handler) pairs whose handler failed for
good. Both keep the raw body and the reason, so ops can read, fix and replay; nothing is dropped.
Each record is one hash, indexed by time in a sorted set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis

from calhook.constants import KEY_PREFIX

PARKED = "parked"
DEAD = "dead"


class RecordStore:
    """Records of one kind (``parked`` or ``dead``) in Redis."""

    def __init__(self, client: redis.Redis, kind: str) -> None:
        self._redis = client
        self.kind = kind
        self._index = f"{KEY_PREFIX}{kind}"
        self._prefix = f"{KEY_PREFIX}{kind}:"

    def _key(self, record_id: str) -> str:
        return f"{self._prefix}{record_id}"

    def put(self, record_id: str, record: dict[str, Any]) -> None:
        """Store ``record`` under ``record_id``; storing the same id again replaces it."""
        now = time.time()
        fields = {k: v if isinstance(v, str) else orjson.dumps(v) for k, v in record.items()}
        fields["id"] = record_id
        fields["stored_at"] = repr(now)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(record_id), mapping=fields)  # type: ignore[arg-type]
            pipe.zadd(self._index, {record_id: now})
            pipe.execute()

    def get(self, record_id: str) -> dict[str, str] | None:
        """The record, or None."""
        raw: dict[bytes, bytes] = self._redis.hgetall(self._key(record_id))  # type: ignore[assignment]
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    def records(self, page: int = 500) -> Iterator[dict[str, str]]:
        """Every record, oldest first, read a page at a time."""
        offset = 0
        while ids := self.ids(limit=page, offset=offset):
            for record_id in ids:
                record = self.get(record_id)
                if record is not None:
                    yield record
            offset += page

    def ids(self, limit: int = 100, offset: int = 0) -> list[str]:
        """Record ids, oldest first."""
        found: list[bytes] = self._redis.zrange(self._index, offset, offset + limit - 1)  # type: ignore[assignment]
        return [i.decode() for i in found]

    def remove(self, record_id: str, pipe: redis.client.Pipeline | None = None) -> None:
        """Delete one record, now or as part of the caller's transaction ``pipe``."""
        if pipe is not None:
            pipe.delete(self._key(record_id))
            pipe.zrem(self._index, record_id)
            return
        with self._redis.pipeline(transaction=True) as own:
            self.remove(record_id, own)
            own.execute()

    def count(self) -> int:
        """How many records there are."""
        return int(self._redis.zcard(self._index))
