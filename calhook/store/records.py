"""Where events that could not be handled wait for people: the parked and dead-letter records.

*Parked*: events dispatch could not route (unknown type, planned type without a handler, a
payload that fails its schema). *Dead letters*: (event, handler) pairs whose handler failed for
good. A record holds the reason and the error; the body stays once, in the event's body key,
for as long as a record needs it. The records are written and removed by the pair transitions
(``lua/``): a dead letter is the pair's ``dead`` state made visible, so replaying and purging
are transitions too (:class:`~calhook.store.pairs.PairStore`).

Both hold personal data (through the body), so neither is kept past ``CALHOOK_RETENTION_DAYS``:
each record and its body carry that TTL, and index entries older than it are purged by
``calhook scheduler``, so a store nobody reads or writes empties itself too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import redis

from calhook.store.keys import DEAD as DEAD_INDEX
from calhook.store.keys import PARKED as PARKED_INDEX
from calhook.store.keys import body_key, record_key
from calhook.store.pairs import PairStore

PARKED = "parked"
DEAD = "dead"
DAY_S = 86_400
_TRIM_BATCH = 500
_INDEX = {PARKED: PARKED_INDEX, DEAD: DEAD_INDEX}


class RecordStore:
    """Records of one kind (``parked`` or ``dead``) in Redis."""

    def __init__(self, client: redis.Redis, kind: str) -> None:
        self._redis = client
        self.kind = kind
        self.index_key = _INDEX[kind]

    def key(self, record_id: str) -> str:
        """The Redis key of one record's hash."""
        return record_key(self.index_key, record_id)

    def trim(self, pairs: PairStore, retention_s: int, now: float | None = None) -> int:
        """Purge the records stored more than ``retention_s`` before ``now``; return how many.

        Their hashes expire by themselves; this drops their index entries (and the bodies
        nothing else needs) through the purge transition.
        """
        cutoff = (time.time() if now is None else now) - retention_s
        erased = 0
        while True:
            old: list[bytes] = self._redis.zrangebyscore(  # type: ignore[assignment]
                self.index_key, "-inf", cutoff, start=0, num=_TRIM_BATCH
            )
            if not old:
                return erased
            # A record stored again since it was read (replayed, failed again) is spared.
            erased += pairs.purge(self.kind, [i.decode() for i in old], stored_before=cutoff)

    def get(self, record_id: str, *, with_body: bool = True) -> dict[str, str] | None:
        """The record with its event's ``body`` (empty if the body is gone), or None."""
        raw: dict[bytes, bytes] = self._redis.hgetall(self.key(record_id))  # type: ignore[assignment]
        if not raw:
            return None
        record = {k.decode(): v.decode() for k, v in raw.items()}
        if with_body:
            body = self._redis.get(body_key(record.get("event_id", "")))
            record["body"] = body.decode() if isinstance(body, bytes) else ""
        return record

    def records(self, page: int = 500, *, with_body: bool = True) -> Iterator[dict[str, str]]:
        """Every record, oldest first, read a page at a time."""
        offset = 0
        while ids := self.ids(limit=page, offset=offset):
            for record_id in ids:
                record = self.get(record_id, with_body=with_body)
                if record is not None:
                    yield record
            offset += page

    def ids(self, limit: int = 100, offset: int = 0) -> list[str]:
        """Record ids, oldest first."""
        found: list[bytes] = self._redis.zrange(self.index_key, offset, offset + limit - 1)  # type: ignore[assignment]
        return [i.decode() for i in found]

    def count(self) -> int:
        """How many records there are."""
        return int(self._redis.zcard(self.index_key))
