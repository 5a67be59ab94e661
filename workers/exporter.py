"""``calhook exporter``: Prometheus metrics of the whole worker side, read from Redis per scrape.

Queue gauges (the ``calhook queues`` table, in pairs), handler outcomes and durations (counted by
every worker in Redis), how many open pairs the scheduler watches, and the day a destination is
down (:mod:`calhook.store.health`): held handlers and their held events, open breakers, failure
groups. Labels are handler, circuit and error class names, states and reasons: never personal
data (a hold's ``by`` label is ``operator`` or ``breaker``, not who paused it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from calhook.settings import get_settings
from calhook.store.connect import pair_store
from calhook.store.health import OPERATOR, Health
from calhook.store.keys import DUE
from calhook.store.queues import queue_table
from calhook.store.stats import durations, outcomes

# Failure groups read per scrape at most: each is one (handler, error class, reason), so many
# more than this would mean error classes that carry data, which labels must not.
_GROUPS_MOST = 1000


class FleetCollector(Collector):
    """Reads everything from Redis at each scrape; nothing is cached between scrapes."""

    def __init__(self, client: redis.Redis, queues: Iterable[str]) -> None:
        self._redis = client
        self._queues = set(queues)
        # Only its reads are used: no script of the store runs from the exporter.
        self._health = Health(pair_store(client, get_settings()).scripts)

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
        yield from self._health_metrics()

    def _health_metrics(self) -> Iterator[Metric]:
        holds = self._health.holds()
        held = GaugeMetricFamily(
            "calhook_handler_held",
            "1 while the handler is held, by an operator or by its circuit's breaker.",
            labels=["handler", "by"],
        )
        events = GaugeMetricFamily(
            "calhook_held_events",
            "Events held for the handler (while it is held, and until its release queued them).",
            labels=["handler"],
        )
        for hold in holds:
            if hold.paused:
                held.add_metric([hold.handler, "breaker" if hold.circuit else OPERATOR], 1)
            events.add_metric([hold.handler], hold.held)
        yield held
        yield events
        breakers = GaugeMetricFamily(
            "calhook_breaker_open",
            "1 while the circuit's breaker is open or half_open (letting one probe through).",
            labels=["circuit", "state"],
        )
        for breaker in self._health.breakers():
            if breaker.state in ("open", "half_open"):
                breakers.add_metric([breaker.circuit, breaker.state], 1)
        yield breakers
        groups = self._health.groups(limit=_GROUPS_MOST)
        by_state = Counter((g.handler, g.reason, g.state) for g in groups)
        counted = GaugeMetricFamily(
            "calhook_failure_groups",
            "Failure groups open or acknowledged, by handler, reason and state.",
            labels=["handler", "reason", "state"],
        )
        for labels, n in sorted(by_state.items()):
            counted.add_metric(list(labels), n)
        yield counted
        failures = GaugeMetricFamily(
            "calhook_failure_group_failures",
            "Failures counted by each open failure group (handler, error class, reason).",
            labels=["handler", "error", "reason"],
        )
        for group in groups:
            if group.state == "open":
                failures.add_metric([group.handler, group.error, group.reason], group.count)
        yield failures
