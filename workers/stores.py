"""Where events that could not be handled wait for people: the parked and dead-letter stores.

*Parked*: events dispatch could not route (unknown type, planned type without a handler, a
payload that fails its schema). *Dead letters*: (event, handler) pairs whose handler failed for
good. Both keep the raw body and the reason, so ops can read, fix and replay; nothing is dropped
while it is wanted. Each record is one hash, indexed by time in a sorted set.

Both hold personal data (the body), so neither keeps it past ``CALHOOK_RETENTION_DAYS``: each
record hash carries that TTL, and index entries older than it are trimmed, with their hashes, on
every write and by ``calhook scheduler`` (workers/delayed.py), so a store nobody reads or writes
empties itself too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis

from calhook.constants import KEY_PREFIX
from calhook.settings import get_settings

PARKED = "parked"
DEAD = "dead"
DAY_S = 86_400
_TRIM_BATCH = 500


def retention_s() -> int:
    """``CALHOOK_RETENTION_DAYS`` of this process's settings, in seconds."""
    return get_settings().retention_s


class RecordStore:
    """Records of one kind (``parked`` or ``dead``) in Redis."""

    def __init__(self, client: redis.Redis, kind: str, retention_s: int | None = None) -> None:
        self._redis = client
        self.kind = kind
        self.index_key = f"{KEY_PREFIX}{kind}"
        self._prefix = f"{KEY_PREFIX}{kind}:"
        self._retention_s = retention_s

    @property
    def retention_s(self) -> int:
        """How long a record is kept: the given value, else ``CALHOOK_RETENTION_DAYS``."""
        if self._retention_s is None:
            # Read on first use, not in __init__: readers (the status page) never need it.
            self._retention_s = retention_s()
        return self._retention_s

    def key(self, record_id: str) -> str:
        """The Redis key of one record's hash."""
        return self._key(record_id)

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
            pipe.expire(self._key(record_id), self.retention_s)
            pipe.zadd(self.index_key, {record_id: now})
            pipe.execute()
        self.trim(now)

    def trim(self, now: float | None = None) -> int:
        """Erase the records stored more than the retention before ``now``; return how many.

        Their hashes expire by themselves; this drops their index entries, and the hashes of
        records written before they carried a TTL.
        """
        cutoff = (time.time() if now is None else now) - self.retention_s
        erased = 0
        while True:
            old: list[bytes] = self._redis.zrangebyscore(  # type: ignore[assignment]
                self.index_key, "-inf", cutoff, start=0, num=_TRIM_BATCH
            )
            if not old:
                return erased
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(self._key(i.decode()) for i in old))
                pipe.zrem(self.index_key, *old)
                pipe.execute()
            erased += len(old)

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
        found: list[bytes] = self._redis.zrange(self.index_key, offset, offset + limit - 1)  # type: ignore[assignment]
        return [i.decode() for i in found]

    def remove(self, record_id: str, pipe: redis.client.Pipeline | None = None) -> None:
        """Delete one record, now or as part of the caller's transaction ``pipe``."""
        if pipe is not None:
            pipe.delete(self._key(record_id))
            pipe.zrem(self.index_key, record_id)
            return
        with self._redis.pipeline(transaction=True) as own:
            self.remove(record_id, own)
            own.execute()

    def count(self) -> int:
        """How many records there are."""
        return int(self._redis.zcard(self.index_key))
