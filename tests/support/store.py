"""Reaching a state of the store through its real transitions (``calhook/store/lua``).

Tests that need an event parked, a dead letter or a pair waiting for a retry get there the way
the pipeline does, by the same scripts, without a worker: so what they read is what production
writes.
"""

from __future__ import annotations

import hashlib
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import orjson
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.ids import new_event_id
from calhook.messages import event_record
from calhook.store.keys import DISPATCH_PAIR, dedup_key
from calhook.store.pairs import Ending, PairStore, Route
from calhook.store.queues import throughput_key

OWNER = "tests:0:owner"


def accept(
    pairs: PairStore,
    body: bytes = b"{}",
    *,
    endpoint: str = "default",
    event_type: str = "customer.created",
    received_at: float | None = None,
) -> str:
    """Store one event as the ingress does (a dispatch message is queued); return its id."""
    event_id = new_event_id()
    digest = hashlib.sha256(endpoint.encode() + b"\0" + body + event_id.encode()).hexdigest()
    at = time.time() if received_at is None else received_at
    record = event_record(endpoint, at, event_type, body)
    assert pairs.accept([(dedup_key(digest), event_id, record)]) == [None]
    return event_id


def start(pairs: PairStore, pair: str, event_ids: Sequence[str], queue: str) -> list[str]:
    """Start the pairs as a worker would (owner :data:`OWNER`); what each start came to."""
    started = pairs.start(pair, event_ids, OWNER, max_starts=5, seq=None, queue=queue, defer_s=1.0)
    return [s.what for s in started]


def route(
    pairs: PairStore, event_id: str, handlers: Sequence[tuple[str, str]], event_type: str = "x"
) -> None:
    """Dispatch one accepted event to ``handlers`` ((name, queue) pairs), as dispatch does."""
    assert start(pairs, DISPATCH_PAIR, [event_id], DISPATCH_QUEUE) == ["run"]
    received = orjson.dumps({"at": time.time(), "what": "received", "type": event_type})
    decision = Route(event_id, event_type, received, [(h, q, "", "") for h, q in handlers])
    assert pairs.fan_out(throughput_key(DISPATCH_QUEUE), 1, [decision]) == ["ok"]


def park(
    pairs: PairStore, event_id: str, reason: str = "unknown_type", event_type: str = "x"
) -> None:
    """Park one accepted event, as dispatch does."""
    assert start(pairs, DISPATCH_PAIR, [event_id], DISPATCH_QUEUE) == ["run"]
    received = orjson.dumps({"at": time.time(), "what": "received", "type": event_type})
    decision = Route(event_id, event_type, received, park_reason=reason)
    assert pairs.fan_out(throughput_key(DISPATCH_QUEUE), 1, [decision]) == ["ok"]


def end(pairs: PairStore, handler: str, queue: str, ending: Ending) -> str:
    """Start one routed pair and end it with ``ending``; the finish result."""
    assert start(pairs, handler, [ending.event_id], queue) == ["run"]
    return pairs.finish(handler, OWNER, throughput_key(queue), [ending])[0]


def dead_letter(
    pairs: PairStore, event_id: str, handler: str, queue: str, error: str = "Boom: no"
) -> None:
    """Route an accepted event to ``handler`` and dead-letter it (a permanent error)."""
    route(pairs, event_id, [(handler, queue)])
    ending = Ending(event_id, "dead", "dead_permanent", reason="permanent", error=error)
    assert end(pairs, handler, queue, ending) == "ok"


# A database of the test Redis that no worker of the session reads.
QUIET_DB = 7


@contextmanager
def quiet_database(redis_url: str) -> Iterator[str]:
    """The URL of another database of the test Redis, empty, and emptied again afterwards.

    The session's worker consumes the queues of the test database: a message a test queues
    there through the transitions (``tests/support/store.py``) may be taken, and its pair
    started, while the test still moves it by hand. Here what is queued stays queued.
    """
    url = urllib.parse.urlsplit(redis_url)._replace(path=f"/{QUIET_DB}").geturl()
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
