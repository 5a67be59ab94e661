"""Work queued by calhook before the pair states (0.1): taken over, not lost, on upgrade.

Messages of that version carry the whole event (``event_id``, ``body``, ``endpoint``,
``received_at``) instead of ids. A legacy dispatch message is stored as an event (with a dedup
key of its own id, so a second copy is one event) and dispatched as usual. A legacy handler
message becomes an event routed to that handler alone, unless the old ledger says the pair
already finished. Retries waiting in the old delayed store are queued at once by the first
scheduler that starts (a little early, never lost); the old watchdog copies are dropped, as they
only repeated messages that are queued, or work that finished.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import redis

from calhook.constants import DEDUP_TTL_S_DEFAULT, DISPATCH_QUEUE
from calhook.messages import event_record
from calhook.store.keys import (
    DISPATCH_PAIR,
    LEGACY_DELAYED,
    LEGACY_DELAYED_MESSAGES,
    LEGACY_LEDGER,
    LEGACY_WATCHDOG,
    LEGACY_WATCHDOG_MESSAGES,
    dedup_key,
)
from calhook.store.pairs import PairStore, Route
from calhook.store.queues import throughput_key

log = logging.getLogger("calhook.worker")

_DELAYED = LEGACY_DELAYED
_DELAYED_MESSAGES = LEGACY_DELAYED_MESSAGES
_WATCHDOG = LEGACY_WATCHDOG
_WATCHDOG_MESSAGES = LEGACY_WATCHDOG_MESSAGES


def is_legacy(kwargs: dict[str, Any]) -> bool:
    """Whether a task's arguments are a 0.1 message (the event itself, no ids)."""
    return "ids" not in kwargs and isinstance(kwargs.get("event_id"), str) and "body" in kwargs


def take_over(pairs: PairStore, kwargs: dict[str, Any], handler: str | None, queue: str) -> None:
    """Store the event of a legacy message and queue its work in the new format: its dispatch,
    or for a handler message that handler alone (unless the old ledger says it finished)."""
    event_id = str(kwargs["event_id"])
    if handler is not None and pairs.client.hget(f"{LEGACY_LEDGER}{event_id}", handler):
        return
    record = event_record(
        str(kwargs.get("endpoint", "default")),
        float(kwargs.get("received_at") or time.time()),
        "",
        str(kwargs["body"]).encode(),
    )
    key = dedup_key(f"legacy:{event_id}")
    # The dedup key must not outlive the event's states (CALHOOK_LEDGER_TTL_S may be a day): a
    # later message of the event would be taken for a duplicate of an event that is gone.
    ttl_s = min(DEDUP_TTL_S_DEFAULT, pairs.scripts.clock.done_ttl_s)
    [first] = pairs.accept([(key, event_id, record)], ttl_s, queue_dispatch=handler is None)
    log.warning("took over a message of calhook 0.1", extra={"event_id": event_id})
    if handler is None:
        return
    started = pairs.start(
        DISPATCH_PAIR, [event_id], "legacy", max_starts=1000, seq=None, queue="", defer_s=1.0
    )
    pair = [(handler, queue, "", "")]
    if first is None and started[0].run:
        # Stored just now: its dispatch is closed with this one pair (0.1 dispatched it).
        received = orjson.dumps({"at": started[0].received_at, "what": "received"})
        route = Route(event_id, "", received, pair)
    else:
        # Stored by another message of 0.1 for this event: this pair is added to it.
        route = Route(event_id, "", b"", pair, add_body=str(kwargs["body"]))
    pairs.fan_out(throughput_key(DISPATCH_QUEUE), 1, [route])


def migrate_stores(client: redis.Redis) -> int:
    """Queue what waits in the 0.1 delayed store, drop its watchdog; how many were queued."""
    moved = 0
    for member, entry in client.hscan_iter(_DELAYED_MESSAGES, count=500):
        queue, _, message = entry.partition(b"\n")
        with client.pipeline(transaction=True) as pipe:
            pipe.lpush(queue.decode(), message)
            pipe.hdel(_DELAYED_MESSAGES, member)
            pipe.zrem(_DELAYED, member)
            pipe.execute()
        moved += 1
    client.delete(_DELAYED, _WATCHDOG, _WATCHDOG_MESSAGES)
    if moved:
        log.warning("queued the retries of calhook 0.1's delayed store", extra={"moved": moved})
    return moved
