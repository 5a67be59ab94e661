"""Handler outcome counts and durations, kept in Redis so one exporter can report a whole fleet.

Worker children are separate processes (prefork); rather than a multiprocess Prometheus registry
on each host, each outcome is counted in Redis, and ``calhook exporter`` reads the counts, with
the queue table, at every scrape. Labels are handler names and outcomes: never personal data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from calhook.store.keys import RECENT_FAILURES, STATS_OUTCOMES, duration_key

OUTCOMES_KEY = STATS_OUTCOMES
RECENT_FAILURES_KEY = RECENT_FAILURES
RECENT_FAILURES_KEPT = 50
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def bucket_of(duration_s: float) -> str:
    """The upper bound of the first histogram bucket ``duration_s`` fits in."""
    return next((f"{b:g}" for b in BUCKETS_S if duration_s <= b), "+Inf")


def _durations_key(handler: str) -> str:
    return duration_key(handler)


def count_outcome(
    target: redis.Redis | redis.client.Pipeline,
    handler: str,
    outcome: str,
    duration_s: float | None,
) -> None:
    """Count one attempt's outcome, and its duration in the first bucket it fits."""
    target.hincrby(OUTCOMES_KEY, f"{handler}\t{outcome}", 1)
    if duration_s is None:
        return
    bucket = bucket_of(duration_s)
    key = _durations_key(handler)
    target.hincrby(key, bucket, 1)
    target.hincrbyfloat(key, "sum", duration_s)


@dataclass(frozen=True, slots=True)
class Durations:
    """One handler's duration histogram: cumulative counts per upper bound, sum, count."""

    handler: str
    cumulative: list[tuple[str, int]]
    total_s: float
    count: int


def outcomes(client: redis.Redis) -> Iterator[tuple[str, str, int]]:
    """(handler, outcome, count) for every pair counted so far."""
    raw: dict[bytes, bytes] = client.hgetall(OUTCOMES_KEY)  # type: ignore[assignment]
    for field, count in raw.items():
        handler, _, outcome = field.decode().partition("\t")
        yield handler, outcome, int(count)


def durations(client: redis.Redis, handlers: set[str]) -> Iterator[Durations]:
    """The duration histogram of each handler that has one."""
    for handler in sorted(handlers):
        raw: dict[bytes, bytes] = client.hgetall(_durations_key(handler))  # type: ignore[assignment]
        if not raw:
            continue
        counts = {k.decode(): v for k, v in raw.items()}
        running = 0
        cumulative = []
        for bound in [*(f"{b:g}" for b in BUCKETS_S), "+Inf"]:
            running += int(counts.get(bound, 0))
            cumulative.append((bound, running))
        yield Durations(handler, cumulative, float(counts.get("sum", 0)), running)


def recent_failures(client: redis.Redis, limit: int = 20) -> list[dict[str, Any]]:
    """The latest failures, newest first."""
    raw: list[bytes] = client.lrange(RECENT_FAILURES_KEY, 0, limit - 1)  # type: ignore[assignment]
    return [orjson.loads(entry) for entry in raw]
