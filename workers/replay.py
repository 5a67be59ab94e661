"""Replay from the dead-letter and parked stores, each in one Redis transaction.

Replaying a dead letter forgets that (event, handler) in the ledger and queues attempt 1 of that
handler alone; replaying a parked event queues its dispatch again (after a handler for its type
was deployed, or a schema fix). The record is removed in the same transaction as the message is
queued, so a replay is never lost and never doubled.
"""

from __future__ import annotations

import redis

from calhook.constants import DISPATCH_QUEUE, DISPATCH_TASK, dispatched_key
from calhook.messages import Delivery, dispatch_message
from workers.dispatch import handler_message
from workers.ledger import Ledger, deliveries_key
from workers.stores import DEAD, PARKED, RecordStore


class ReplayError(Exception):
    """Raised when a record to replay does not exist."""


def _delivery(record: dict[str, str]) -> Delivery:
    return Delivery(
        record["event_id"], record["body"], record["endpoint"], float(record["received_at"])
    )


def replay_dead(client: redis.Redis, record_id: str, ledger: Ledger) -> str:
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
        store.remove(record_id, pipe)
        pipe.execute()
    return queue


def replay_parked(client: redis.Redis, record_id: str) -> None:
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
        pipe.lpush(DISPATCH_QUEUE, dispatch_message(delivery, record.get("type", "")))
        store.remove(record_id, pipe)
        pipe.execute()
