"""Running one handler over a batch of events: each once, in order, retried, or dead.

A task names a few events; starting them (``start.lua``, one round trip for the batch) takes
the messages of the same handler waiting next on its queue too, up to ``CALHOOK_BATCH_MAX``
events, and decides per event whether it runs here: not if its pair is done or dead, running
under a live lease elsewhere, waiting for a retry that is not due, or stale for its entity; an
attempt started too often without finishing is dead-lettered as poison instead. The batch then
runs, each event under a lease the process's heartbeat renews:

- a sync handler runs the events one after another on the task's thread;
- an ``async def`` handler runs them concurrently on the process's event loop, at most its
  ``concurrency`` at once in the whole process.

Each ending is recorded as soon as it is known (:mod:`workers.bookkeeping` gathers the endings
that arrive together into one round trip), so a worker killed halfway re-runs only the events
whose ending was not yet recorded:

- success → ``done``;
- :class:`~workers.errors.Defer` → the same attempt waits (a rate limit), no step spent;
- a permanent error → dead letter;
- anything else, after a few quick in-call retries for transient errors (tenacity; seconds,
  well inside the task time limit) → the next attempt waits for the schedule's next delay (or
  the handler's ``Retry-After``), and the dead-letter store once the schedule is exhausted.

Two kinds of event wait for a later step of the same task: one started before without finishing
(it may be what killed that run, so it starts alone, just before it runs, and only its own
starts count towards poison), and one whose entity has an older event in the batch (it starts
once that one has finished: events of one entity apply in version order). A batch that runs
past half the soft time limit hands its remaining events back (deferred, no attempt spent)
rather than be killed with them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import redis
from celery.exceptions import SoftTimeLimitExceeded
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from calhook import logs
from calhook.privacy import payload_strings, scrub
from calhook.settings import Settings
from calhook.store.connect import async_twin
from calhook.store.keys import due_member
from calhook.store.pairs import AsyncPairStore, Ending, PairStore, Started
from calhook.store.queues import throughput_key
from calhook.store.scripts import AsyncScripts
from schemas import CalensoEvent, SchemaError, parse_event
from workers.bookkeeping import Recorder
from workers.errors import Defer, PermanentError, RetryLater, TransientError, UnknownHandler
from workers.heartbeat import Heartbeat
from workers.loop import ProcessLoop, process_loop
from workers.registry import Handler, HandlerContext, Registry

log = logging.getLogger("calhook.worker")

# Of the soft time limit, the share a batch may run before it hands back what it has not run.
_BUDGET_SHARE = 0.5
# A sync handler's endings are recorded together, in one round trip, once the oldest of them has
# waited this long (and at the end of the batch): fast handlers share a round trip, and a handler
# slower than this has each ending recorded before the next event runs.
_RECORD_WITHIN_S = 0.005


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
    # A failure of the destination rather than of the event: it counts towards the breaker.
    transient: bool = False


@dataclass(frozen=True, slots=True)
class _Batch:
    """One step of a task: the handler, where its endings count, and until when it may run."""

    handler: Handler | None
    name: str
    throughput: str
    deadline: float
    # Which step of the task (its later events start in later steps): what a step hands back
    # is due that many ms from now, so the versions of one entity come back in their order.
    step: int = 0
    # Events already parsed by this process (a dispatch running its handlers' pairs itself).
    parsed: Mapping[str, CalensoEvent] = field(default_factory=dict)


class HandlerRunner:
    """Runs handler messages against one Redis; one per worker process."""

    def __init__(
        self,
        pairs: PairStore,
        registry: Registry,
        heartbeat: Heartbeat,
        settings: Settings,
        *,
        loop: ProcessLoop = process_loop,
        recorder: Callable[[], Recorder] | None = None,
    ) -> None:
        self._pairs = pairs
        self._registry = registry
        self._heartbeat = heartbeat
        self._settings = settings
        self._loop = loop
        self._make_recorder = recorder or self._default_recorder
        self._recorders: dict[int, Recorder] = {}
        self._caps: dict[tuple[int, str], asyncio.Semaphore] = {}
        soft_s = max(1, settings.task_time_limit_s * 9 // 10)
        self._budget_s = soft_s * _BUDGET_SHARE

    def _default_recorder(self) -> Recorder:
        # On the loop this runs on (the process's): a client belongs to the loop it was made on.
        scripts = AsyncScripts(async_twin(self._pairs.client), self._pairs.scripts.clock)
        owner = self._heartbeat.owner
        return Recorder(AsyncPairStore(scripts), lambda: owner, self._settings.lease_s / 2)

    @property
    def budget_s(self) -> float:
        """How long one task may run its batches before it hands back what is left."""
        return self._budget_s

    def close(self) -> None:
        """Close the clients of its recorders (tests; a worker's runner lives as long as its
        process)."""
        recorders, self._recorders = list(self._recorders.values()), {}
        for recorder in recorders:
            self._loop.run(recorder.aclose())

    def _recorder(self) -> Recorder:
        """The recorder of the running loop (a forked child has its own loop)."""
        key = id(asyncio.get_running_loop())
        if key not in self._recorders:
            self._recorders[key] = self._make_recorder()
        return self._recorders[key]

    def run(
        self,
        handler_name: str,
        event_ids: Sequence[str],
        seq: int | None = None,
        queue: str = "",
        *,
        deadline: float | None = None,
        parsed: Mapping[str, CalensoEvent] | None = None,
    ) -> dict[str, str]:
        """Run one message of a handler, with the messages it takes along (with no
        ``event_ids``: the messages of the handler waiting next on ``queue``); return each
        event's outcome (for logs and tests). ``deadline`` (``time.monotonic()``): when the
        batch hands back what it has not run, if sooner than its own budget. ``parsed``: events
        this process parsed already (models are frozen), not parsed again."""
        with logs.bind(handler=handler_name):
            try:
                h: Handler | None = self._registry.get(handler_name)
            except UnknownHandler:
                h = None
            batch = _Batch(
                h,
                handler_name,
                throughput_key(h.queue if h else queue),
                min(time.monotonic() + self._budget_s, deadline or float("inf")),
                parsed=parsed or {},
            )
            outcomes: dict[str, str] = {}
            started = self._start(batch, event_ids, seq, queue, most=self._settings.batch_max)
            suspects: list[Started] = []
            while True:
                self._run_step(batch, started, outcomes)
                suspects += [s for s in started if s.what == "suspect"]
                later = sorted((s for s in started if s.what == "later"), key=lambda s: s.order)
                if not later:
                    break
                batch = replace(batch, step=batch.step + 1)
                started = self._start(batch, [s.event_id for s in later], None, queue, most=0)
            # Suspects last, each started alone just before it runs: if one of them kills this
            # run too, it alone has one more start counted.
            for s in sorted(suspects, key=lambda s: s.order):
                [alone] = self._start(batch, [s.event_id], None, queue, most=0, alone=True)
                self._run_step(batch, [alone], outcomes)
            return outcomes

    def _start(
        self,
        batch: _Batch,
        event_ids: Sequence[str],
        seq: int | None,
        queue: str,
        *,
        most: int,
        alone: bool = False,
    ) -> list[Started]:
        return self._pairs.start(
            batch.name,
            event_ids,
            self._heartbeat.owner,
            max_starts=self._settings.max_deliveries,
            seq=seq,
            queue=queue,
            defer_s=self._settings.order_wait_s,
            batch=not alone,
            most=max(most, len(event_ids)),
        )

    def _run_step(
        self, batch: _Batch, started: Sequence[Started], outcomes: dict[str, str]
    ) -> None:
        """Run what ``started`` says to run, and wait until every ending is recorded."""
        for s in started:
            if not s.run and not s.pending:
                outcomes[s.event_id] = _not_run(s)
        runs = [s for s in started if s.run]
        if not runs:
            return
        members = [due_member(s.event_id, batch.name) for s in runs]
        self._heartbeat.hold(*members)
        began = time.perf_counter()
        try:
            if batch.handler is not None and batch.handler.is_async:
                results = self._loop.run(self._run_async(batch, batch.handler, runs))
            else:
                results = self._run_sync(batch, runs)
        finally:
            self._heartbeat.release(*members)
        done: list[str] = []
        for s, (ending, result) in zip(runs, results, strict=True):
            outcomes[s.event_id] = ending.outcome
            if ending.do == "done" and result == "ok":
                done.append(s.event_id)
            else:
                _log_ending(s, ending, result)
        if done:
            # One line per batch for the events that went well; each event's story (its
            # attempt, its duration) is in its trail.
            log.info(
                "handler done",
                extra={
                    "event_ids": done,
                    "events": len(done),
                    "outcome": "ok",
                    "duration_ms": _ms(time.perf_counter() - began),
                },
            )

    # --- sync handlers: one after another on this thread -------------------------------------

    def _run_sync(self, batch: _Batch, runs: Sequence[Started]) -> list[tuple[Ending, str]]:
        endings: list[Ending] = []
        results: list[str] = []
        since = 0.0  # when the oldest ending not yet recorded was known
        try:
            for s in runs:
                try:
                    if len(results) < len(endings) and time.monotonic() - since >= _RECORD_WITHIN_S:
                        results += self._record_sync(batch, endings[len(results) :])
                    if time.monotonic() > batch.deadline:
                        ending = _handed_back(s, batch.step)
                    else:
                        with logs.bind(event_id=s.event_id, attempt=s.attempt, type=s.type[:100]):
                            ending = self._run(batch, s)
                        if ending.fields.get("error") == "SoftTimeLimitExceeded":
                            # The hard limit is near: what is left goes back rather than die
                            # with us.
                            batch = replace(batch, deadline=0.0)
                except SoftTimeLimitExceeded:
                    # Struck outside the handler (recording endings, reading the event): this
                    # event has not run; it and the rest go back too.
                    batch = replace(batch, deadline=0.0)
                    ending = _handed_back(s, batch.step)
                if len(results) == len(endings):
                    since = time.monotonic()
                endings.append(ending)
        finally:
            # Also when the task is torn down halfway (a shutdown, a time limit): what ran is
            # recorded, and only the rest runs again.
            if len(results) < len(endings):
                results += self._record_sync(batch, endings[len(results) :])
        return list(zip(endings, results, strict=True))

    def _record_sync(self, batch: _Batch, endings: Sequence[Ending]) -> list[str]:
        """Record endings, through a Redis blip: the effects happened, so losing their outcomes
        would run them again. Tried for half a lease (the heartbeat keeps the pairs meanwhile)."""
        for try_ in Retrying(
            stop=stop_after_delay(self._settings.lease_s / 2),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(redis.RedisError),
            reraise=True,
        ):
            with try_:
                return self._pairs.finish(
                    batch.name, self._heartbeat.owner, batch.throughput, endings
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _record(self, batch: _Batch, ending: Ending) -> str:
        return await self._recorder().record(batch.name, batch.throughput, ending)

    def _run(self, batch: _Batch, s: Started) -> Ending:
        started = time.perf_counter()
        prepared = self._prepare(batch, s)
        if isinstance(prepared, Ending):
            return prepared
        h, event, ctx = prepared
        quick = self._quick_retries(h)
        try:
            for try_ in Retrying(
                stop=stop_after_attempt(quick + 1),
                wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
                retry=retry_if_exception(_is_transient),
                reraise=True,
            ):
                with try_:
                    h.fn(event, ctx)
        except Exception as exc:
            duration_s = time.perf_counter() - started
            return self._failed(h, s, exc, duration_s, cost_s=duration_s)
        duration_s = time.perf_counter() - started
        return _done(s, duration_s, cost_s=duration_s)

    # --- async handlers: concurrently on the process's event loop ----------------------------

    async def _run_async(
        self, batch: _Batch, h: Handler, runs: Sequence[Started]
    ) -> list[tuple[Ending, str]]:
        cap = self._cap(h)

        async def one(s: Started) -> tuple[Ending, str]:
            async with cap:
                if time.monotonic() > batch.deadline:
                    ending = _handed_back(s, batch.step)
                else:
                    # The loop's tasks do not inherit the task thread's log context.
                    with logs.bind(
                        handler=batch.name,
                        event_id=s.event_id,
                        attempt=s.attempt,
                        type=s.type[:100],
                    ):
                        ending = await self._run_one_async(batch, h, s)
            return ending, await self._record(batch, ending)

        results = await asyncio.gather(*(one(s) for s in runs), return_exceptions=True)
        # An event that tore the task down (not an Exception: it has no ending) waits for the
        # others: they run on this loop, and their leases are renewed until the task returns.
        endings: list[tuple[Ending, str]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            endings.append(result)
        return endings

    async def _run_one_async(self, batch: _Batch, h: Handler, s: Started) -> Ending:
        started = time.perf_counter()
        prepared = self._prepare(batch, s)
        if isinstance(prepared, Ending):
            return prepared
        _, event, ctx = prepared
        fn: Callable[[Any, HandlerContext], Awaitable[None]] = h.fn  # type: ignore[assignment]
        try:
            async with asyncio.timeout(max(batch.deadline - time.monotonic(), 0.001)):
                async for try_ in AsyncRetrying(
                    stop=stop_after_attempt(self._quick_retries(h) + 1),
                    wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
                    retry=retry_if_exception(_is_transient),
                    reraise=True,
                ):
                    with try_:
                        await fn(event, ctx)
        except Exception as exc:
            return self._failed(h, s, exc, time.perf_counter() - started, cost_s=0.0)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the batch is cancelled (its task torn down)
            # Raised by the handler itself (a library's inner task): a failure like any other.
            return self._failed(h, s, exc, time.perf_counter() - started, cost_s=0.0)
        # The events of a batch wait together: one more costs the batch next to nothing.
        return _done(s, time.perf_counter() - started, cost_s=0.0)

    def _cap(self, h: Handler) -> asyncio.Semaphore:
        """The handler's concurrency cap on the running loop, shared by every task of the
        process."""
        key = (id(asyncio.get_running_loop()), h.name)
        if key not in self._caps:
            self._caps[key] = asyncio.Semaphore(h.concurrency or self._settings.async_concurrency)
        return self._caps[key]

    # --- shared by both ----------------------------------------------------------------------

    def _prepare(
        self, batch: _Batch, s: Started
    ) -> Ending | tuple[Handler, CalensoEvent, HandlerContext]:
        """The event and its context, or the ending of an event that cannot run."""
        h = batch.handler
        if h is None:
            # Kept, not dropped: replay once the module is loaded by the workers of this queue.
            error = f"UnknownHandler: no handler named {batch.name!r} is loaded"
            return Ending(
                s.event_id, "dead", "dead_unknown_handler", reason="unknown_handler", error=error
            )
        try:
            event = batch.parsed.get(s.event_id) or parse_event(
                orjson.loads(s.body), created_tz=self._settings.zone
            )
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
        return h, event, HandlerContext(s.event_id, h.name, s.endpoint, s.received_at, s.attempt)

    def _quick_retries(self, h: Handler) -> int:
        quick = h.retry.quick_retries
        return self._settings.quick_retries if quick is None else quick

    def _failed(
        self, h: Handler, s: Started, exc: BaseException, duration_s: float, *, cost_s: float
    ) -> Ending:
        failure = self._failure(h, s.attempt, exc)
        fields: dict[str, object] = {"error": _name(exc), "duration_ms": _ms(duration_s)}
        if failure.delay_s is not None:
            fields["retry_in_s"] = round(failure.delay_s, 3)
            fields["next_attempt_at"] = round(time.time() + failure.delay_s, 3)
        error = f"{type(exc).__name__}: {exc}"[:2000]
        return Ending(
            s.event_id,
            failure.do,
            failure.outcome,
            fields,
            delay_s=failure.delay_s,
            duration_s=duration_s if failure.do != "defer" else None,
            reason=failure.reason,
            error=error,
            traceback=_trace(exc) if failure.do == "dead" else "",
            cost_s=cost_s,
            gist=scrub(error, _personal(s.body)) if failure.do != "defer" else "",
            breaker=self._breaker(h) if failure.transient else None,
        )

    def _breaker(self, h: Handler) -> dict[str, Any] | None:
        """What finish.lua needs to count a transient failure towards ``h``'s breaker."""
        settings = self._settings
        if settings.breaker_failures <= 0:
            return None
        circuit = h.breaker_circuit
        return {
            "c": circuit,
            "h": list(self._registry.circuit(circuit)) or [h.name],
            "n": settings.breaker_failures,
            "w": int(settings.breaker_window_s * 1000),
            "p": int(settings.breaker_probe_s * 1000),
            "m": int(max(settings.breaker_probe_max_s, settings.breaker_probe_s) * 1000),
        }

    def _failure(self, h: Handler, attempt: int, exc: BaseException) -> _Failure:
        if isinstance(exc, Defer):
            return _Failure("defer", "deferred", max(exc.after_s, 0.05))
        if isinstance(exc, (PermanentError, *h.retry.permanent)):
            return _Failure("dead", "dead_permanent", reason="permanent")
        schedule = h.retry.schedule_s or self._settings.retry_schedule_s
        if attempt > len(schedule):
            return _Failure("dead", "dead_exhausted", reason="exhausted", transient=True)
        if isinstance(exc, RetryLater):
            delay_s = max(exc.after_s, 0.0)
        else:
            jitter = self._settings.retry_jitter
            delay_s = schedule[attempt - 1] * (1 + random.uniform(-jitter, jitter))  # noqa: S311
        return _Failure("retry", "retry_scheduled", delay_s, transient=True)


def _done(s: Started, duration_s: float, cost_s: float) -> Ending:
    return Ending(
        s.event_id,
        "done",
        "ok",
        {"duration_ms": _ms(duration_s)},
        duration_s=duration_s,
        cost_s=cost_s,
    )


def _handed_back(s: Started, step: int) -> Ending:
    """An event its batch had no time left for: it waits for the next task, no attempt spent
    (due ``step`` ms from now: a later version of an entity after an older one)."""
    return Ending(
        s.event_id, "defer", "deferred", {"why": "batch out of time"}, delay_s=step / 1000
    )


def _log_ending(s: Started, ending: Ending, result: str) -> None:
    """One line for an event that did not simply succeed."""
    level = logging.INFO if ending.do in ("done", "defer") else logging.WARNING
    if ending.do == "dead":
        level = logging.ERROR
    message = {"done": "handler done", "defer": "handler deferred"}.get(ending.do, "handler failed")
    if result != "ok":
        # Another copy finished it first, or took it over after this run stalled past its
        # lease: that copy's outcome stands.
        level, message = logging.WARNING, f"outcome not recorded ({result})"
    fields = {"event_id": s.event_id, "attempt": s.attempt, "type": s.type[:100]}
    log.log(level, message, extra={**fields, "outcome": ending.outcome, **ending.fields})


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
    if s.what == "held":
        # Its handler is paused or its breaker open (calhook handlers): one line per event
        # would flood the log for as long as the outage lasts.
        log.debug("held", extra={"event_id": s.event_id, "outcome": "held"})
        return "held"
    log.info("not run", extra={"event_id": s.event_id, "why": s.what})
    return f"not_run_{s.what}"


def _personal(body: str) -> set[str]:
    """What of the event's body an error might echo (masked in its failure group's text)."""
    try:
        return payload_strings(orjson.loads(body))
    except orjson.JSONDecodeError:
        return set()


def _name(exc: BaseException) -> str:
    return "SoftTimeLimitExceeded" if isinstance(exc, SoftTimeLimitExceeded) else type(exc).__name__


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc, limit=-8))[-4000:]


def _ms(duration_s: float) -> float:
    return round(duration_s * 1000, 1)
