"""The ingress's Prometheus metrics, on a registry of its own per app.

Labels never carry personal data, and their values are bounded: endpoints are the configured
names, types the catalogue's (anything else counts as ``other``), statuses the few we answer.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from schemas import KNOWN_TYPES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class IngressMetrics:
    """Counters, histograms and gauges of one ingress process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "calhook_ingress_requests",
            "Webhook requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.events = Counter(
            "calhook_ingress_events",
            "Events made durable, by endpoint, type and where (redis, spool, duplicate).",
            ["endpoint", "type", "outcome"],
            registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "calhook_ingress_ack_seconds",
            "Time from a webhook's arrival to its answer.",
            ["endpoint"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "calhook_ingress_publish_batch_size",
            "Events written to Redis in one script call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.spool_depth = Gauge(
            "calhook_ingress_spool_depth",
            "Events in this process's spool, not yet in Redis.",
            registry=self.registry,
        )
        self.spooling = Gauge(
            "calhook_ingress_spooling",
            "1 while new events go to the spool instead of Redis.",
            registry=self.registry,
        )

    def watch_spool(self, depth: Callable[[], int], spooling: Callable[[], bool]) -> None:
        """Read the spool's state at each scrape."""
        self.spool_depth.set_function(lambda: float(depth()))
        self.spooling.set_function(lambda: float(spooling()))

    def event(self, endpoint: str, event_type: str, outcome: str) -> None:
        """Count one event, with an unknown type counted as ``other``."""
        label = event_type if event_type in KNOWN_TYPES else "other"
        self.events.labels(endpoint, label, outcome).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
