"""``calhook exporter``: Prometheus metrics of the whole worker side, read from Redis per scrape.

Queue gauges (the ``calhook queues`` table, in pairs), handler outcomes and durations (counted by
every worker in Redis), and how many open pairs the scheduler watches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from calhook.store.keys import DUE
from calhook.store.queues import queue_table
from calhook.store.stats import durations, outcomes


class FleetCollector(Collector):
    """Reads everything from Redis at each scrape; nothing is cached between scrapes."""

    def __init__(self, client: redis.Redis, queues: Iterable[str]) -> None:
        self._redis = client
        self._queues = set(queues)

    def collect(self) -> Iterator[Metric]:
        rows = queue_table(self._redis, self._queues)
        gauges = {
            "ready": "Pairs (an event for one handler) queued and not started yet.",
            "running": "Pairs being run by a worker (under a live or expiring lease).",
            "unacked": "Messages taken by a worker and not acknowledged yet.",
            "delayed": "Pairs waiting for a retry, an order lock or a rate limit.",
            "dead": "Dead letters of the queue's handlers.",
            "parked": "Events dispatch could not route.",
        }
        for field, doc in gauges.items():
            family = GaugeMetricFamily(f"calhook_queue_{field}", doc, labels=["queue"])
            for row in rows:
                family.add_metric([row.queue], getattr(row, field))
            yield family
        oldest = GaugeMetricFamily(
            "calhook_queue_oldest_age_seconds",
            "Age of the oldest event waiting on the queue (0 when none waits).",
            labels=["queue"],
        )
        done = GaugeMetricFamily(
            "calhook_queue_done_last_minute",
            "Tasks of the queue finished in the last minute.",
            labels=["queue"],
        )
        for row in rows:
            oldest.add_metric([row.queue], row.oldest_age_s or 0.0)
            done.add_metric([row.queue], row.done_last_min)
        yield oldest
        yield done

        counted = CounterMetricFamily(
            "calhook_handler_outcomes",
            "Handler attempts by outcome (ok, retry_scheduled, deferred, dead_*, skipped_stale).",
            labels=["handler", "outcome"],
        )
        handlers = set()
        for handler, outcome, count in outcomes(self._redis):
            counted.add_metric([handler, outcome], count)
            handlers.add(handler)
        yield counted
        histogram = HistogramMetricFamily(
            "calhook_handler_duration_seconds",
            "Time one handler attempt took.",
            labels=["handler"],
        )
        for d in durations(self._redis, handlers):
            histogram.add_metric([d.handler], [(b, float(c)) for b, c in d.cumulative], d.total_s)
        yield histogram
        yield GaugeMetricFamily(
            "calhook_pairs_watched",
            "Open pairs (queued, running or waiting) the scheduler's sweep watches.",
            value=int(self._redis.zcard(DUE)),
        )
