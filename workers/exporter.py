"""``calhook exporter``: Prometheus metrics of the whole worker side, read from Redis per scrape.

Queue gauges (the ``calhook queues`` table), handler outcomes and durations (counted by every
worker in Redis), and the sizes of the delayed store and the watchdog.
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

from calhook.constants import WATCHDOG_KEY
from workers.delayed import DUE_KEY
from workers.queues import queue_table
from workers.stats import durations, outcomes


class FleetCollector(Collector):
    """Reads everything from Redis at each scrape; nothing is cached between scrapes."""

    def __init__(self, client: redis.Redis, queues: Iterable[str]) -> None:
        self._redis = client
        self._queues = set(queues)

    def collect(self) -> Iterator[Metric]:
        rows = queue_table(self._redis, self._queues)
        gauges = {
            "ready": "Messages waiting on the queue.",
            "unacked": "Messages taken by a worker and not acknowledged yet.",
            "delayed": "Retries of the queue's handlers due later.",
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
            "calhook_queue_done_last_minute", "Tasks of the queue finished in the last minute.",
            labels=["queue"],
        )  # fmt: skip
        for row in rows:
            oldest.add_metric([row.queue], row.oldest_age_s or 0.0)
            done.add_metric([row.queue], row.done_last_min)
        yield oldest
        yield done

        counted = CounterMetricFamily(
            "calhook_handler_outcomes", "Handler attempts by outcome (ok, retry_scheduled, "
            "dead_*, skipped_stale, already_*).", labels=["handler", "outcome"],
        )  # fmt: skip
        handlers = set()
        for handler, outcome, count in outcomes(self._redis):
            counted.add_metric([handler, outcome], count)
            handlers.add(handler)
        yield counted
        histogram = HistogramMetricFamily(
            "calhook_handler_duration_seconds", "Time one handler attempt took.",
            labels=["handler"],
        )  # fmt: skip
        for d in durations(self._redis, handlers):
            histogram.add_metric([d.handler], [(b, float(c)) for b, c in d.cumulative], d.total_s)
        yield histogram
        yield GaugeMetricFamily(
            "calhook_delayed_total", "Retries waiting in the delayed store.",
            value=int(self._redis.zcard(DUE_KEY)),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "calhook_watchdog_watched", "Queued messages whose work has not finished yet.",
            value=int(self._redis.zcard(WATCHDOG_KEY)),
        )  # fmt: skip
