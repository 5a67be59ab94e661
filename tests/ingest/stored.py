"""What the ingress left in Redis, read as a worker would find it; and a database to lay out
states in that no worker reads.

The ingress queues one dispatch message per batch of accepted events (``accept.lua``); it names
the events by id (``kwargs["ids"]``), never carries a body. Each event's body is stored once, in
``calhook:body:<id>``, beside its metadata and the state of its dispatch (``calhook:ev:<id>``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from calhook.messages import read_task_message
from calhook.store.keys import DISPATCH_PAIR, DISPATCH_QUEUE, body_key, event_key

Message = tuple[str, list[Any], dict[str, Any], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Stored:
    """One accepted event as Redis holds it."""

    event_id: str
    endpoint: str
    received_at: float
    type: str
    body: bytes
    dispatch: str  # the state of the event's dispatch pair


def messages(raw: Iterable[bytes | str]) -> list[Message]:
    """Decoded task messages of a queue as ``LRANGE 0 -1`` returns them, oldest first (LPUSH
    adds on the left)."""
    return [read_task_message(m) for m in reversed(list(raw))]


def ids_of(raw: Iterable[bytes | str]) -> list[str]:
    """Every event id the messages name, in queue order."""
    return [str(i) for _, _, kwargs, _ in messages(raw) for i in kwargs["ids"]]


def dispatch_messages(client: redis.Redis) -> list[Message]:
    """The dispatch queue's messages, oldest first."""
    raw: list[bytes] = client.lrange(DISPATCH_QUEUE, 0, -1)  # type: ignore[assignment]
    return messages(raw)


def queued_ids(client: redis.Redis) -> list[str]:
    """The ids of the events queued for dispatch, in the order they were queued."""
    raw: list[bytes] = client.lrange(DISPATCH_QUEUE, 0, -1)  # type: ignore[assignment]
    return ids_of(raw)


def stored(client: redis.Redis, event_id: str) -> Stored | None:
    """The event's metadata, body and dispatch state, or None if Redis has no such event."""
    raw: dict[bytes, bytes] = client.hgetall(event_key(event_id))  # type: ignore[assignment]
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    body = client.get(body_key(event_id))
    return Stored(
        event_id,
        fields["ep"],
        float(fields["at"]),
        fields["type"],
        body if isinstance(body, bytes) else b"",
        fields[f"{DISPATCH_PAIR}/s"],
    )


def queued(client: redis.Redis) -> list[Stored]:
    """Every event queued for dispatch, as stored, in the order queued."""
    found = [stored(client, i) for i in queued_ids(client)]
    assert None not in found, "a dispatch message names an event Redis does not hold"
    return [s for s in found if s is not None]
