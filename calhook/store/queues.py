"""What is in every queue, read from Redis alone (no worker needed).

``LLEN`` counts messages, and a message may name many events; Celery on Redis also holds messages
that workers took and have not acked (kombu's ``unacked`` hash), and retries wait in the pair
states, not in any queue. Flower shows none of these (RELIABILITY.md item 14). So the table
counts pairs, from the per-queue counts every transition keeps: ready (queued, not yet started),
running, delayed (waiting for a retry, a lock or a rate limit), held (their handler is paused or
its breaker open), dead and parked, with the unacked messages, the age of the oldest waiting
event, how long the oldest held one has waited and how much finished in the last minute.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.messages import read_task_message
from calhook.store.keys import (
    HELD,
    HELD_STATE,
    HOLDING,
    QUEUED,
    RUNNING,
    UNACKED,
    WAITING,
    event_key,
    pairs_key,
)
from calhook.store.keys import throughput_key as _throughput_key
from calhook.store.records import DEAD, PARKED, RecordStore

UNACKED_KEY = UNACKED
# The table's columns, as the terminal and the status page head them.
HEAD = ("queue", "ready", "running", "unacked", "delayed", "held", "dead", "parked", "oldest",
        "held-for", "done/min")  # fmt: skip
_BUCKET_S = 10
_WINDOW_S = 60


def throughput_key(queue: str, at_s: float | None = None) -> str:
    """The key counting work finished on ``queue`` in the 10 s around ``at_s`` (now)."""
    return _throughput_key(queue, int(time.time() if at_s is None else at_s) // _BUCKET_S)


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One queue's state, in pairs (an event for one handler), not messages."""

    queue: str
    ready: int
    running: int
    unacked: int
    delayed: int
    dead: int
    parked: int
    oldest_age_s: float | None
    done_last_min: int
    held: int = 0
    oldest_held_age_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _counts(client: redis.Redis, state: str) -> Counter[str]:
    raw: dict[bytes, bytes] = client.hgetall(pairs_key(state))  # type: ignore[assignment]
    return Counter({k.decode(): max(int(v), 0) for k, v in raw.items()})


def _oldest_age_s(client: redis.Redis, queue: str, now: float) -> float | None:
    # LPUSH adds on the left and workers take from the right: the oldest waits at the right end.
    raw = client.lindex(queue, -1)
    if raw is None:
        return None
    try:
        ids = read_task_message(raw)[2].get("ids") or []
        received_at = client.hget(event_key(str(ids[0])), "at")
    except (ValueError, KeyError, TypeError, IndexError, orjson.JSONDecodeError):
        return None
    if received_at is None:
        return None
    return max(now - float(received_at), 0.0)


def _oldest_held(client: redis.Redis, now: float) -> dict[str, float]:
    """Per queue, how long its oldest held event has waited (since it was received)."""
    oldest: dict[str, float] = {}
    handlers: set[bytes] = client.smembers(HOLDING)  # type: ignore[assignment]
    for raw in handlers:
        handler = raw.decode()
        first: list[tuple[bytes, float]] = client.zrange(f"{HELD}{handler}", 0, 0, withscores=True)  # type: ignore[assignment]
        if not first:
            continue
        event_id, received_at = first[0]
        queue: bytes | None = client.hget(event_key(event_id.decode()), f"{handler}/q")  # type: ignore[assignment]
        if queue is not None:
            name = queue.decode()
            oldest[name] = max(oldest.get(name, 0.0), max(now - float(received_at), 0.0))
    return oldest


def queue_table(client: redis.Redis, queues: Iterable[str]) -> list[QueueRow]:
    """A row for each of ``queues`` and for every other queue the stores mention."""
    now = time.time()
    unacked: Counter[str] = Counter()
    for _, raw in client.hscan_iter(UNACKED_KEY, count=1000):
        try:
            unacked[str(orjson.loads(raw)[2])] += 1
        except (orjson.JSONDecodeError, IndexError, TypeError):
            continue
    ready, running, delayed, held = (
        _counts(client, s) for s in (QUEUED, RUNNING, WAITING, HELD_STATE)
    )
    held_for = _oldest_held(client, now)
    dead: Counter[str] = Counter(
        r.get("queue", "?") for r in RecordStore(client, DEAD).records(with_body=False)
    )
    parked = RecordStore(client, PARKED).count()
    names = sorted(
        {*queues, DISPATCH_QUEUE, *unacked, *(+ready), *(+running), *(+delayed), *(+held), *dead}
    )
    buckets = [int(now) // _BUCKET_S - i for i in range(_WINDOW_S // _BUCKET_S)]
    rows = []
    for name in names:
        done = client.mget([_throughput_key(name, b) for b in buckets])
        rows.append(
            QueueRow(
                queue=name,
                ready=ready[name],
                running=running[name],
                unacked=unacked[name],
                delayed=delayed[name],
                dead=dead[name],
                parked=parked if name == DISPATCH_QUEUE else 0,
                oldest_age_s=_oldest_age_s(client, name, now),
                done_last_min=sum(int(v) for v in done if v),
                held=held[name],
                oldest_held_age_s=held_for.get(name),
            )
        )
    return rows


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_table(rows: list[QueueRow]) -> str:
    """The rows as a text table for a terminal."""
    head = HEAD
    lines = [
        (
            r.queue,
            r.ready,
            r.running,
            r.unacked,
            r.delayed,
            r.held,
            r.dead,
            r.parked,
            _age(r.oldest_age_s),
            _age(r.oldest_held_age_s),
            r.done_last_min,
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *lines, strict=True)]
    out = []
    for line in (head, *lines):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in pairs]
        out.append("  ".join(cells))
    return "\n".join(out)
