"""Replay from the dead-letter and parked stores, each in one Redis transaction.

Replaying a dead letter forgets that (event, handler) in the ledger and queues attempt 1 of that
handler alone; replaying a parked event queues its dispatch again (after a handler for its type
was deployed, or a schema fix). The record is removed in the same transaction as the message is
queued, so a replay is never lost and never doubled.
"""

from __future__ import annotations

import time

import redis

from calhook.constants import DISPATCH_QUEUE, DISPATCH_TASK, dispatched_key, pair_id
from calhook.messages import Delivery, dispatch_message
from workers.dispatch import handler_message
from workers.ledger import Ledger, deliveries_key
from workers.stores import DEAD, PARKED, RecordStore
from workers.watchdog import Watchdog


class ReplayError(Exception):
    """Raised when a record to replay does not exist."""


def _delivery(record: dict[str, str]) -> Delivery:
    return Delivery(
        record["event_id"], record["body"], record["endpoint"], float(record["received_at"])
    )


def replay_dead(client: redis.Redis, record_id: str, ledger: Ledger, watchdog: Watchdog) -> str:
    """Queue the handler of dead letter ``record_id`` again; return the queue."""
    store = RecordStore(client, DEAD)
    record = store.get(record_id)
    if record is None:
        raise ReplayError(f"no dead letter {record_id}")
    delivery = _delivery(record)
    handler, queue = record["handler"], record["queue"]
    message = handler_message(handler, queue, delivery, record.get("type", ""), 1)
    with client.pipeline(transaction=True) as pipe:
        ledger.forget(delivery.event_id, handler, pipe)
        pipe.lpush(queue, message)
        watchdog.arm(pair_id(delivery.event_id, handler), queue, message, time.time(), pipe)
        store.remove(record_id, pipe)
        pipe.execute()
    return queue


def replay_parked(client: redis.Redis, record_id: str, watchdog: Watchdog) -> None:
    """Queue the dispatch of parked event ``record_id`` again."""
    store = RecordStore(client, PARKED)
    record = store.get(record_id)
    if record is None:
        raise ReplayError(f"no parked event {record_id}")
    delivery = _delivery(record)
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(dispatched_key(delivery.event_id))
        # A replayed "poison" event starts with a clean delivery count.
        pipe.hdel(deliveries_key(delivery.event_id), f"{DISPATCH_TASK}#1")
        message = dispatch_message(delivery, record.get("type", ""))
        pipe.lpush(DISPATCH_QUEUE, message)
        watchdog.arm(delivery.event_id, DISPATCH_QUEUE, message, time.time(), pipe)
        store.remove(record_id, pipe)
        pipe.execute()
