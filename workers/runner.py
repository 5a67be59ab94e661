"""Running one (event, handler): once, in order, retried on a schedule, or dead-lettered.

For each delivery of a handler task:

1. The ledger says the pair already finished → nothing runs (a redelivery after completion).
2. The message arrived more than ``CALHOOK_MAX_DELIVERIES`` times without finishing → it keeps
   killing its worker; dead-letter it instead of looping.
3. An ``ordered`` handler sees only events newer than the entity's last applied one.
4. The handler runs, with a few quick in-call retries for transient errors (tenacity; seconds,
   well inside the task time limit).
5. Success → ledger ``done``. A permanent error → dead letter. Anything else → the next attempt
   goes into the delayed store at the schedule's next delay (or the handler's ``Retry-After``),
   and the dead-letter store once the schedule is exhausted.
"""

from __future__ import annotations

import logging
import random
import time
import traceback

import orjson
import redis
from celery.exceptions import SoftTimeLimitExceeded
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from calhook import logs
from calhook.constants import pair_id
from calhook.messages import Delivery
from calhook.settings import Settings
from schemas import CalensoEvent, SchemaError, parse_event
from workers.delayed import DelayedStore
from workers.dispatch import handler_message
from workers.errors import PermanentError, RetryLater, TransientError, UnknownHandler
from workers.ledger import Ledger, Outcome
from workers.ordering import OrderGuard, version_of
from workers.queues import count_finished
from workers.registry import Handler, HandlerContext, Registry
from workers.stats import count_outcome, note_failure
from workers.stores import DEAD, RecordStore
from workers.trail import Trail
from workers.watchdog import Watchdog

log = logging.getLogger("calhook.worker")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PermanentError | RetryLater):
        return False
    return isinstance(exc, TransientError | ConnectionError | TimeoutError)


class HandlerRunner:
    """Runs handler tasks against one Redis; one per worker process."""

    def __init__(self, client: redis.Redis, registry: Registry, settings: Settings) -> None:
        self._registry = registry
        self._settings = settings
        self._redis = client
        self.ledger = Ledger(client, settings.ledger_ttl_s)
        self.dead = RecordStore(client, DEAD, settings.retention_s)
        self.delayed = DelayedStore(client)
        self.watchdog = Watchdog(client, settings.watchdog_s)
        self.trail = Trail(client, settings.trail_keep_s)
        self.guard = OrderGuard(client, ttl_s=90 * 86_400, lock_s=settings.task_time_limit_s)

    def run(self, handler_name: str, delivery: Delivery, attempt: int, queue: str = "") -> str:
        """Run one delivery of a handler task; return what came of it (for logs and tests)."""
        with logs.bind(handler=handler_name, attempt=attempt):
            try:
                h = self._registry.get(handler_name)
            except UnknownHandler as exc:
                # Kept, not dropped: replay once the module is in CALHOOK_HANDLER_MODULES.
                unknown = Handler(handler_name, frozenset(), queue, _unknown_handler)
                self._dead_letter(unknown, delivery, attempt, "unknown_handler", str(exc), None)
                return self._report(delivery, handler_name, attempt, logging.ERROR,
                                    "handler failed", "dead_unknown_handler")  # fmt: skip
            return self._run(h, delivery, attempt)

    def _run(self, h: Handler, delivery: Delivery, attempt: int) -> str:
        event_id = delivery.event_id
        # One round trip: a redelivery of finished work is counted too, which is harmless.
        prior, deliveries = self.ledger.begin(event_id, h.name, attempt)
        if prior is not None:
            return self._report(delivery, h.name, attempt, logging.INFO, "already finished",
                                f"already_{prior.value}")  # fmt: skip
        if deliveries > self._settings.max_deliveries:
            self._dead_letter(
                h,
                delivery,
                attempt,
                "poison",
                f"delivered {deliveries - 1} times without finishing; it may kill its worker",
                None,
            )
            return self._report(delivery, h.name, attempt, logging.ERROR, "handler failed",
                                "dead_poison")  # fmt: skip

        started = time.perf_counter()
        try:
            event = parse_event(orjson.loads(delivery.body), created_tz=self._settings.zone)
        except SchemaError as exc:
            self._dead_letter(h, delivery, attempt, "permanent", f"schema: {exc}", exc)
            return self._report(delivery, h.name, attempt, logging.ERROR, "handler failed",
                                "dead_permanent", error="SchemaError")  # fmt: skip
        ctx = HandlerContext(event_id, h.name, delivery.endpoint, delivery.received_at, attempt)
        version = (h.order_key or version_of)(event, event_id) if h.ordered else None
        with logs.bind(type=event.type):
            try:
                with self.guard.hold(h.order_scope or h.name, version) as fresh:
                    if not fresh:
                        self.ledger.record(event_id, h.name, Outcome.SKIPPED_STALE)
                        return self._report(delivery, h.name, attempt, logging.INFO,
                                            "skipped stale", "skipped_stale")  # fmt: skip
                    self._call(h, event, ctx)
            except Exception as exc:
                return self._failed(h, delivery, event.type, attempt, exc, started)
            # The outcome, the watchdog's stop, the counters and the trail: one round trip.
            fields: dict[str, object] = {"duration_ms": _ms(started)}
            with self._redis.pipeline(transaction=True) as pipe:
                self.ledger.record_to(pipe, event_id, h.name, Outcome.DONE)
                count_finished(pipe, h.queue)
                self._record_attempt(pipe, delivery, h.name, attempt, "ok", fields)
                pipe.execute()
            log.info("handler done", extra={"outcome": "ok", **fields})
            return "done"

    def _call(self, h: Handler, event: CalensoEvent, ctx: HandlerContext) -> None:
        quick = h.retry.quick_retries
        quick = self._settings.quick_retries if quick is None else quick
        for try_ in Retrying(
            stop=stop_after_attempt(quick + 1),
            wait=wait_exponential_jitter(initial=0.2, max=2.0),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        ):
            with try_:
                h.fn(event, ctx)

    def _failed(
        self,
        h: Handler,
        delivery: Delivery,
        event_type: str,
        attempt: int,
        exc: Exception,
        started: float,
    ) -> str:
        extra = {"error": type(exc).__name__, "duration_ms": _ms(started)}
        if isinstance(exc, (PermanentError, *h.retry.permanent)):
            self._dead_letter(h, delivery, attempt, "permanent", _describe(exc), exc, event_type)
            return self._report(delivery, h.name, attempt, logging.ERROR, "handler failed",
                                "dead_permanent", **extra)  # fmt: skip
        schedule = h.retry.schedule_s or self._settings.retry_schedule_s
        if attempt > len(schedule):
            self._dead_letter(h, delivery, attempt, "exhausted", _describe(exc), exc, event_type)
            return self._report(delivery, h.name, attempt, logging.ERROR, "handler failed",
                                "dead_exhausted", **extra)  # fmt: skip
        if isinstance(exc, RetryLater):
            delay_s = max(exc.after_s, 0.0)
        else:
            jitter = self._settings.retry_jitter
            delay_s = schedule[attempt - 1] * (1 + random.uniform(-jitter, jitter))  # noqa: S311
        if isinstance(exc, SoftTimeLimitExceeded):
            extra["error"] = "SoftTimeLimitExceeded"
        due_s = time.time() + delay_s
        message = handler_message(h.name, h.queue, delivery, event_type, attempt + 1)
        self.delayed.schedule(f"{pair_id(delivery.event_id, h.name)}#{attempt + 1}", h.queue,
                              message, due_s)  # fmt: skip
        # Watch the next attempt from its due time on, not from now.
        self.watchdog.arm(pair_id(delivery.event_id, h.name), h.queue, message, due_s)
        return self._report(delivery, h.name, attempt, logging.WARNING, "handler failed",
                            "retry_scheduled", **extra, retry_in_s=round(delay_s, 3),
                            next_attempt_at=round(due_s, 3))  # fmt: skip

    def _report(
        self,
        delivery: Delivery,
        handler: str,
        attempt: int,
        level: int,
        message: str,
        outcome: str,
        **fields: object,
    ) -> str:
        """Log what came of an attempt and add it to the event's trail; return the outcome."""
        log.log(level, message, extra={"outcome": outcome, **fields})
        with self._redis.pipeline(transaction=False) as pipe:
            self._record_attempt(pipe, delivery, handler, attempt, outcome, fields)
            pipe.execute()
        if outcome == "retry_scheduled" or outcome.startswith("dead_"):
            note_failure(self._redis, event_id=delivery.event_id, handler=handler,
                         attempt=attempt, outcome=outcome, error=str(fields.get("error", "")),
                         at=time.time())  # fmt: skip
        return outcome

    def _record_attempt(
        self,
        pipe: redis.client.Pipeline,
        delivery: Delivery,
        handler: str,
        attempt: int,
        outcome: str,
        fields: dict[str, object],
    ) -> None:
        self.trail.add_to(pipe, delivery.event_id, "handler", handler=handler, attempt=attempt,
                          outcome=outcome, **fields)  # fmt: skip
        duration_ms = fields.get("duration_ms")
        duration_s = float(duration_ms) / 1000 if isinstance(duration_ms, int | float) else None
        count_outcome(pipe, handler, outcome, duration_s)

    def _dead_letter(
        self,
        h: Handler,
        delivery: Delivery,
        attempt: int,
        reason: str,
        error: str,
        exc: BaseException | None,
        event_type: str = "",
    ) -> None:
        summary = "".join(traceback.format_exception(exc, limit=-8))[-4000:] if exc else ""
        self.dead.put(
            pair_id(delivery.event_id, h.name),
            {
                **{k: str(v) for k, v in delivery.task_kwargs().items()},
                "handler": h.name,
                "queue": h.queue,
                "type": event_type,
                "reason": reason,
                "error": error[:2000],
                "traceback": summary,
                "attempts": str(attempt),
                "failed_at": repr(time.time()),
            },
        )
        self.ledger.record(delivery.event_id, h.name, Outcome.DEAD)


def _unknown_handler(event: object, ctx: HandlerContext) -> None:
    raise UnknownHandler(ctx.handler)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
