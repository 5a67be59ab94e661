"""What is in every queue, read from Redis alone (no worker needed).

``LLEN`` sees only the messages waiting; Celery on Redis also holds messages that workers took
and have not acked (kombu's ``unacked`` hash), calhook holds retries due later (the delayed
store), and what failed for good (dead letters, parked events). Flower shows none of these
(RELIABILITY.md item 14). One row per queue: ready, unacked, delayed, dead, parked, the age of
the oldest waiting event, and how many tasks finished in the last minute.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis

from calhook.constants import DISPATCH_QUEUE, KEY_PREFIX
from calhook.messages import read_task_message
from workers.delayed import MESSAGES_KEY as DELAYED_MESSAGES_KEY
from workers.stores import DEAD, PARKED, RecordStore

UNACKED_KEY = "unacked"  # kombu's default names
_BUCKET_S = 10
_WINDOW_S = 60


def throughput_key(queue: str, bucket: int) -> str:
    return f"{KEY_PREFIX}throughput:{queue}:{bucket}"


def count_finished(client: redis.Redis | redis.client.Pipeline, queue: str) -> None:
    """Count one task of ``queue`` finished now (for the last-minute throughput)."""
    key = throughput_key(queue, int(time.time()) // _BUCKET_S)
    client.incr(key)
    client.expire(key, _WINDOW_S * 2)


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One queue's state."""

    queue: str
    ready: int
    unacked: int
    delayed: int
    dead: int
    parked: int
    oldest_age_s: float | None
    done_last_min: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _queue_of_entry(entry: bytes) -> str:
    return entry.split(b"\n", 1)[0].decode()


def _oldest_age_s(client: redis.Redis, queue: str, now: float) -> float | None:
    # LPUSH adds on the left and workers take from the right: the oldest waits at the right end.
    raw = client.lindex(queue, -1)
    if raw is None:
        return None
    try:
        received_at = float(read_task_message(raw)[2].get("received_at", now))
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        return None
    return max(now - received_at, 0.0)


def queue_table(client: redis.Redis, queues: Iterable[str]) -> list[QueueRow]:
    """A row for each of ``queues`` and for every other queue the stores mention."""
    now = time.time()
    unacked: Counter[str] = Counter()
    for _, raw in client.hscan_iter(UNACKED_KEY, count=1000):
        try:
            unacked[str(orjson.loads(raw)[2])] += 1
        except (orjson.JSONDecodeError, IndexError, TypeError):
            continue
    delayed: Counter[str] = Counter(
        _queue_of_entry(entry) for _, entry in client.hscan_iter(DELAYED_MESSAGES_KEY, count=1000)
    )
    dead: Counter[str] = Counter(r.get("queue", "?") for r in RecordStore(client, DEAD).records())
    parked = RecordStore(client, PARKED).count()
    names = sorted({*queues, DISPATCH_QUEUE, *unacked, *delayed, *dead})
    buckets = [int(now) // _BUCKET_S - i for i in range(_WINDOW_S // _BUCKET_S)]
    rows = []
    for name in names:
        done = client.mget([throughput_key(name, b) for b in buckets])
        rows.append(
            QueueRow(
                queue=name,
                ready=int(client.llen(name)),
                unacked=unacked[name],
                delayed=delayed[name],
                dead=dead[name],
                parked=parked if name == DISPATCH_QUEUE else 0,
                oldest_age_s=_oldest_age_s(client, name, now),
                done_last_min=sum(int(v) for v in done if v),
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
    head = ("queue", "ready", "unacked", "delayed", "dead", "parked", "oldest", "done/min")
    lines = [
        (
            r.queue,
            r.ready,
            r.unacked,
            r.delayed,
            r.dead,
            r.parked,
            _age(r.oldest_age_s),
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
