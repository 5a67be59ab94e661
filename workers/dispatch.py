"""Dispatch: validate accepted events fully, then route each to its handlers, or park it.

Events that cannot be routed are parked with the reason, never dropped (DESIGN.md rule 1):
a payload that fails its schema, a type nobody knows, a planned type nobody handles yet, a current
type whose handlers are all switched off. ``calhook parked`` shows them; replay dispatches again.

A dispatch message names the events of one ingress batch. Starting them is one round trip that
also returns their bodies and takes the dispatch messages waiting behind it, up to
``CALHOOK_BATCH_MAX`` events (under a backlog one task dispatches many); the decisions for all
of them are one more (``fan_out.lua``), which creates each (event, handler) pair and queues one
message per handler for the events it applies to. Dispatch is deterministic, so a second run of
the same event (a redelivery after a crash) decides the same and writes nothing. An event whose
dispatch started before without finishing is dispatched alone, so that only its own starts count
towards poison.

A worker that consumes a handler's queue as well runs that handler's new pairs itself, in the
same task, when nothing waits on the queue (``fan_out.lua`` then queues no message for them):
under light load an event costs one Celery task instead of two; under a backlog the handler's
message waits its turn.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Collection, Sequence
from datetime import tzinfo

import orjson

from calhook.constants import DISPATCH_QUEUE
from calhook.store.keys import DISPATCH_PAIR
from calhook.store.pairs import PairStore, Route, Started
from calhook.store.queues import throughput_key
from schemas import PLANNED_TYPES, CalensoEvent, SchemaError, family_of, parse_event
from workers.heartbeat import Heartbeat
from workers.ordering import version_of
from workers.registry import Handler, Registry
from workers.runner import HandlerRunner

log = logging.getLogger("calhook.dispatch")


class ParkReason(enum.StrEnum):
    """Why an event was parked instead of dispatched."""

    SCHEMA_INVALID = "schema_invalid"
    UNKNOWN_TYPE = "unknown_type"
    PLANNED_TYPE = "planned_type_without_handler"
    NO_HANDLER = "no_handler"


def _order(h: Handler, event: CalensoEvent, event_id: str) -> tuple[str, str]:
    """The pair's order entity and version, or two empty strings for an unordered handler."""
    if not h.ordered:
        return "", ""
    version = (h.order_key or version_of)(event, event_id)
    if version is None:
        return "", ""
    return f"{h.order_scope or h.name}:{version.entity}", version.encode()


class Dispatcher:
    """Routes events to their handlers' queues, or parks them."""

    def __init__(
        self,
        pairs: PairStore,
        registry: Registry,
        heartbeat: Heartbeat,
        zone: tzinfo,
        *,
        max_starts: int,
        batch_max: int,
        runner: HandlerRunner | None = None,
    ) -> None:
        self._pairs = pairs
        self._runner = runner
        self._registry = registry
        self._heartbeat = heartbeat
        self._zone = zone
        self._max_starts = max_starts
        self._batch_max = batch_max

    def dispatch(
        self,
        event_ids: Sequence[str],
        seq: int | None = None,
        *,
        run_here: Collection[str] = (),
    ) -> dict[str, list[str]]:
        """Route the events; return the handler names of each routed event (for logs, tests).
        ``run_here``: the queues this worker consumes; the new pairs of their handlers it runs
        itself when nothing waits on their queue."""
        deadline = time.monotonic() + (self._runner.budget_s if self._runner else 0.0)
        here = [h.name for h in self._registry if h.queue in run_here] if self._runner else []
        started = self._start(event_ids, seq, batch=True)
        routed = self._fan_out([s for s in started if s.run], here, deadline)
        for s in started:
            if s.what == "suspect":
                alone = [s for s in self._start([s.event_id], None) if s.run]
                routed |= self._fan_out(alone, here, deadline)
            elif not s.run:
                level = logging.ERROR if s.what == "poison" else logging.INFO
                log.log(level, "not dispatched", extra={"event_id": s.event_id, "why": s.what})
        return routed

    def _start(
        self, event_ids: Sequence[str], seq: int | None, *, batch: bool = False
    ) -> list[Started]:
        return self._pairs.start(
            DISPATCH_PAIR,
            event_ids,
            self._heartbeat.owner,
            max_starts=self._max_starts,
            seq=seq,
            queue=DISPATCH_QUEUE,
            defer_s=1.0,
            batch=batch,
            most=self._batch_max if batch else len(event_ids),
        )

    def _fan_out(
        self, started: Sequence[Started], here: Sequence[str], deadline: float
    ) -> dict[str, list[str]]:
        if not started:
            return {}
        parsed: dict[str, CalensoEvent] = {}
        routes = [self._route(s, parsed) for s in started]
        results, inline = self._pairs.fan_out_here(
            throughput_key(DISPATCH_QUEUE), self._batch_max, routes, here
        )
        routed: dict[str, list[str]] = {}
        for route, result in zip(routes, results, strict=True):
            if result != "ok":
                log.info("already dispatched", extra={"event_id": route.event_id})
            elif route.park_reason:
                log.warning(
                    "parked",
                    extra={
                        "event_id": route.event_id,
                        "type": route.type[:100],
                        "reason": route.park_reason,
                        "errors": list(route.park_errors),
                    },
                )
            else:
                routed[route.event_id] = [h[0] for h in route.handlers]
        if routed:
            # One line per batch; each event's handlers are in its trail.
            log.info("dispatched", extra={"event_ids": list(routed), "events": len(routed)})
        for name, queue, ids in inline:
            # Nothing waited on the handler's queue: run its new pairs here, in this task.
            assert self._runner is not None
            self._runner.run(name, ids, None, queue, deadline=deadline, parsed=parsed)
        return routed

    def _route(self, s: Started, parsed: dict[str, CalensoEvent]) -> Route:
        """Dispatch's decision for one started event; a parsed event goes into ``parsed``."""
        received = orjson.dumps(
            {
                "at": s.received_at,
                "what": "received",
                "type": s.type[:100],
                "endpoint": s.endpoint,
                "bytes": len(s.body.encode()),
            }
        )
        try:
            event = parse_event(orjson.loads(s.body), created_tz=self._zone)
        except (SchemaError, orjson.JSONDecodeError) as exc:
            errors = getattr(exc, "errors", [{"loc": "", "msg": "body is not JSON", "type": ""}])
            return Route(
                s.event_id,
                s.type[:100],
                received,
                park_reason=ParkReason.SCHEMA_INVALID,
                park_errors=errors,
            )
        handlers = self._registry.for_type(event.type)
        if not handlers:
            if family_of(event.type) is None:
                reason = ParkReason.UNKNOWN_TYPE
            elif event.type in PLANNED_TYPES:
                reason = ParkReason.PLANNED_TYPE
            else:
                reason = ParkReason.NO_HANDLER
            return Route(s.event_id, event.type[:100], received, park_reason=reason)
        parsed[s.event_id] = event
        return Route(
            s.event_id,
            event.type[:100],
            received,
            handlers=[
                (h.name, h.queue, *_order(h, event, s.event_id), "async" if h.is_async else "")
                for h in handlers
            ],
        )
