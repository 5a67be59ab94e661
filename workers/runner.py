"""Running one handler over the events a message names: once, in order, retried, or dead.

For each event the message names, starting the attempt (``start.lua``, just before it would run)
decides whether it runs here: not if its pair is done or dead, running under a live lease
elsewhere, waiting for a retry that is not due, or stale for its entity; an attempt started too
often without finishing is dead-lettered as poison instead. The attempts that start run one after
another, each under a lease its heartbeat renews, and each ending is recorded as soon as it is
known (``finish.lua``), so a worker killed halfway re-runs only the events that had not finished:

- success → ``done``;
- :class:`~workers.errors.Defer` → the same attempt waits (a rate limit), no step spent;
- a permanent error → dead letter;
- anything else, after a few quick in-call retries for transient errors (tenacity; seconds,
  well inside the task time limit) → the next attempt waits for the schedule's next delay (or
  the handler's ``Retry-After``), and the dead-letter store once the schedule is exhausted.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import redis
from celery.exceptions import SoftTimeLimitExceeded
from tenacity import (
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from calhook import logs
from calhook.settings import Settings
from calhook.store.keys import due_member
from calhook.store.pairs import Ending, PairStore, Started
from calhook.store.queues import throughput_key
from schemas import CalensoEvent, SchemaError, parse_event
from workers.errors import Defer, PermanentError, RetryLater, TransientError, UnknownHandler
from workers.heartbeat import Heartbeat
from workers.loop import process_loop
from workers.registry import Handler, HandlerContext, Registry

log = logging.getLogger("calhook.worker")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PermanentError | RetryLater | Defer):
        return False
    return isinstance(exc, TransientError | ConnectionError | TimeoutError)


@dataclass(frozen=True, slots=True)
class _Failure:
    """What the runner does with a failed attempt."""

    do: str
    outcome: str
    delay_s: float | None = None
    reason: str = ""


class HandlerRunner:
    """Runs handler messages against one Redis; one per worker process."""

    def __init__(
        self, pairs: PairStore, registry: Registry, heartbeat: Heartbeat, settings: Settings
    ) -> None:
        self._pairs = pairs
        self._registry = registry
        self._heartbeat = heartbeat
        self._settings = settings

    def run(
        self, handler_name: str, event_ids: Sequence[str], seq: int | None = None, queue: str = ""
    ) -> dict[str, str]:
        """Run one message of a handler; return each event's outcome (for logs and tests)."""
        with logs.bind(handler=handler_name):
            try:
                h: Handler | None = self._registry.get(handler_name)
            except UnknownHandler:
                h = None
            outcomes: dict[str, str] = {}
            # Each event starts just before it runs, not every event of the message at once: a
            # pair started early would be running under a lease nobody renews while the others
            # run, and a crash of an earlier event would count as a start of it (poison without
            # having run). The message stays unacked meanwhile, so its later pairs are pending.
            for event_id in event_ids:
                [s] = self._pairs.start(
                    handler_name,
                    [event_id],
                    self._heartbeat.owner,
                    max_starts=self._settings.max_deliveries,
                    seq=seq,
                    queue=queue,
                    defer_s=self._settings.order_wait_s,
                )
                if s.run:
                    outcomes[s.event_id] = self._attempt(h, handler_name, queue, s)
                else:
                    outcomes[s.event_id] = _not_run(s)
            return outcomes

    def _attempt(self, h: Handler | None, name: str, queue: str, s: Started) -> str:
        member = due_member(s.event_id, name)
        self._heartbeat.hold(member)
        try:
            with logs.bind(event_id=s.event_id, attempt=s.attempt, type=s.type[:100]):
                ending = self._run(h, name, s)
                result = self._record(name, throughput_key(h.queue if h else queue), ending)
                level = logging.INFO if ending.do in ("done", "defer") else logging.WARNING
                if ending.do == "dead":
                    level = logging.ERROR
                message = "handler done" if ending.do == "done" else "handler failed"
                if ending.do == "defer":
                    message = "handler deferred"
                if result != "ok":
                    # Another copy finished it first, or took it over after this run stalled
                    # past its lease: that copy's outcome stands.
                    level, message = logging.WARNING, f"outcome not recorded ({result})"
                log.log(level, message, extra={"outcome": ending.outcome, **ending.fields})
                return ending.outcome
        finally:
            self._heartbeat.release(member)

    def _record(self, name: str, throughput: str, ending: Ending) -> str:
        """Record the ending, through a Redis blip: the effect happened, so losing its outcome
        would run it again. Tried for half a lease (the heartbeat keeps the pair meanwhile)."""
        for try_ in Retrying(
            stop=stop_after_delay(self._settings.lease_s / 2),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(redis.RedisError),
            reraise=True,
        ):
            with try_:
                return self._pairs.finish(name, self._heartbeat.owner, throughput, [ending])[0]
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, h: Handler | None, name: str, s: Started) -> Ending:
        started = time.perf_counter()
        if h is None:
            # Kept, not dropped: replay once the module is loaded by the workers of this queue.
            error = f"UnknownHandler: no handler named {name!r} is loaded"
            return Ending(
                s.event_id, "dead", "dead_unknown_handler", reason="unknown_handler", error=error
            )
        try:
            event = parse_event(orjson.loads(s.body), created_tz=self._settings.zone)
        except (SchemaError, orjson.JSONDecodeError) as exc:
            return Ending(
                s.event_id,
                "dead",
                "dead_permanent",
                {"error": "SchemaError"},
                reason="permanent",
                error=f"schema: {exc}"[:2000],
                traceback=_trace(exc),
            )
        ctx = HandlerContext(s.event_id, h.name, s.endpoint, s.received_at, s.attempt)
        try:
            self._call(h, event, ctx)
        except Exception as exc:
            duration_s = time.perf_counter() - started
            failure = self._failure(h, s.attempt, exc)
            fields: dict[str, object] = {"error": _name(exc), "duration_ms": _ms(duration_s)}
            if failure.delay_s is not None:
                fields["retry_in_s"] = round(failure.delay_s, 3)
                fields["next_attempt_at"] = round(time.time() + failure.delay_s, 3)
            return Ending(
                s.event_id,
                failure.do,
                failure.outcome,
                fields,
                delay_s=failure.delay_s,
                duration_s=duration_s if failure.do != "defer" else None,
                reason=failure.reason,
                error=f"{type(exc).__name__}: {exc}"[:2000],
                traceback=_trace(exc) if failure.do == "dead" else "",
            )
        duration_s = time.perf_counter() - started
        return Ending(
            s.event_id, "done", "ok", {"duration_ms": _ms(duration_s)}, duration_s=duration_s
        )

    def _call(self, h: Handler, event: CalensoEvent, ctx: HandlerContext) -> None:
        quick = h.retry.quick_retries
        quick = self._settings.quick_retries if quick is None else quick
        for try_ in Retrying(
            stop=stop_after_attempt(quick + 1),
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        ):
            with try_:
                if h.is_async:
                    process_loop.run(h.fn(event, ctx))  # type: ignore[arg-type]
                else:
                    h.fn(event, ctx)

    def _failure(self, h: Handler, attempt: int, exc: Exception) -> _Failure:
        if isinstance(exc, Defer):
            return _Failure("defer", "deferred", max(exc.after_s, 0.05))
        if isinstance(exc, (PermanentError, *h.retry.permanent)):
            return _Failure("dead", "dead_permanent", reason="permanent")
        schedule = h.retry.schedule_s or self._settings.retry_schedule_s
        if attempt > len(schedule):
            return _Failure("dead", "dead_exhausted", reason="exhausted")
        if isinstance(exc, RetryLater):
            delay_s = max(exc.after_s, 0.0)
        else:
            jitter = self._settings.retry_jitter
            delay_s = schedule[attempt - 1] * (1 + random.uniform(-jitter, jitter))  # noqa: S311
        return _Failure("retry", "retry_scheduled", delay_s)


def _not_run(s: Started) -> str:
    """Log why a named event did not run here; return it as the outcome."""
    if s.what == "poison":
        log.error("handler failed", extra={"event_id": s.event_id, "outcome": "dead_poison"})
        return "dead_poison"
    if s.what == "stale":
        log.info("skipped stale", extra={"event_id": s.event_id, "outcome": "skipped_stale"})
        return "skipped_stale"
    if s.what == "deferred":
        log.info("waits for its entity", extra={"event_id": s.event_id, "outcome": "deferred"})
        return "deferred"
    log.info("not run", extra={"event_id": s.event_id, "why": s.what})
    return f"not_run_{s.what}"


def _name(exc: BaseException) -> str:
    return "SoftTimeLimitExceeded" if isinstance(exc, SoftTimeLimitExceeded) else type(exc).__name__


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc, limit=-8))[-4000:]


def _ms(duration_s: float) -> float:
    return round(duration_s * 1000, 1)
