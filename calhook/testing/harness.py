"""Running a handler as calhook runs it, in the test's process, against a real Redis.

::

    result = harness.run(sync_bookings, sample_1, sample_2)
    assert result.outcome(sample_1) == "done"
    assert result.attempts(sample_2) == 3

The events are accepted as the ingress accepts them, dispatched to the handler alone, and run by
the workers' own runner (:class:`workers.runner.HandlerRunner`): each (event, handler) once (the
same body given twice is one event, as the ingress recognises a retransmission),
retried on a fast schedule, events of one entity in version order for an ordered handler, dead
letters for what fails for good, sync and ``async def`` handlers alike. The run ends when every
event's pair is final (or after ``timeout_s``). Nothing else of calhook runs: no Celery, no
scheduler process; the harness takes the messages and sweeps for retries itself. The handler
runs whatever its ``enabled=`` says: the test decides.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.ids import new_event_id
from calhook.messages import event_record, read_task_message
from calhook.redis_url import redact
from calhook.settings import Settings, load_settings
from calhook.store.connect import pair_store
from calhook.store.keys import DISPATCH_PAIR, DUE, dedup_key, due_member
from calhook.store.pairs import PairStore
from calhook.store.records import DEAD, RecordStore
from calhook.store.trail import Trail
from calhook.testing.events import Sample
from workers.dispatch import Dispatcher
from workers.heartbeat import Heartbeat
from workers.registry import Handler, Registry, registry
from workers.runner import HandlerRunner
from workers.scheduler import sweep_once

# A retry schedule of milliseconds: a test sees every attempt without waiting for one.
FAST = {
    "retry_schedule_s": "0.01,0.02,0.03",
    "retry_jitter": 0.0,
    "quick_retries": 0,
    "order_wait_s": 0.02,
    "breaker_failures": 0,
}


class HarnessError(Exception):
    """Raised for a handler the harness cannot find, or a run that does not settle in time."""


@dataclass(frozen=True)
class PairResult:
    """How one event ended for the handler."""

    event_id: str
    state: str  # done, dead, stale (an older version of its entity), or what it was left in
    attempts: int
    runs: int  # how many times the handler was called for it
    outcomes: tuple[str, ...]  # each call's outcome: ok, retry_scheduled, dead_permanent …
    errors: tuple[str, ...]  # the error class of each failed call
    dead_letter: dict[str, str] | None = None  # reason, error, attempts … (no body)


@dataclass
class Result:
    """What a run did, per event (in the order they were given)."""

    handler: str
    pairs: list[PairResult] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def of(self, sample: Sample | int) -> PairResult:
        """The result of ``sample`` (or of the event at that position)."""
        if isinstance(sample, int):
            return self.pairs[sample]
        for candidate, pair in zip(self.samples, self.pairs, strict=True):
            if candidate is sample:
                return pair
        raise KeyError("that sample was not part of the run")

    def outcome(self, sample: Sample | int) -> str:
        return self.of(sample).state

    def attempts(self, sample: Sample | int) -> int:
        return self.of(sample).attempts

    @property
    def dead_letters(self) -> list[dict[str, str]]:
        return [p.dead_letter for p in self.pairs if p.dead_letter is not None]


# Marks a database as the harness's own: it empties only an empty database or one it marked.
OWNED_KEY = "calhook:testing:harness"


class Harness:
    """Runs handlers against the Redis at ``redis_url``, whose database it empties each run
    (an empty one, or one it used before: it refuses a database holding anything else)."""

    def __init__(self, redis_url: str, **settings: Any) -> None:
        self.settings: Settings = load_settings(redis_url=redis_url, **{**FAST, **settings})
        self.client = redis.Redis.from_url(redis_url)
        self._where = redact(redis_url)

    def close(self) -> None:
        self.client.close()

    def _empty(self) -> None:
        """Empty the database, if it is empty already or the harness's own."""
        if self.client.dbsize() and not self.client.exists(OWNED_KEY):
            raise HarnessError(
                f"the Redis database {self._where} holds keys calhook.testing did not write, "
                "and each run empties it: give the tests a database of their own "
                "(CALHOOK_TEST_REDIS_URL=redis://host:6379/15, say), or empty that one yourself"
            )
        with self.client.pipeline() as pipe:
            pipe.flushdb()
            pipe.set(OWNED_KEY, "1")
            pipe.execute()

    def run(
        self,
        handler: Handler | Callable[..., Any] | str,
        *events: Sample | bytes,
        timeout_s: float = 30.0,
        endpoint: str = "default",
    ) -> Result:
        """Deliver ``events`` (in this order) to ``handler`` alone and wait until each is final."""
        h = find(handler)
        self._empty()
        solo = Registry()
        solo.register(h)
        pairs = pair_store(self.client, self.settings)
        ids = self._accept(pairs, events, endpoint)
        heartbeat = Heartbeat(pairs, self.settings.lease_s)
        runner = HandlerRunner(pairs, solo, heartbeat, self.settings)
        dispatcher = Dispatcher(
            pairs,
            solo,
            heartbeat,
            self.settings.zone,
            max_starts=self.settings.max_deliveries,
            batch_max=self.settings.batch_max,
            runner=runner,
        )
        try:
            self._drive(pairs, dispatcher, runner, h, ids, timeout_s)
        finally:
            heartbeat.stop()
            runner.close()
        samples = [e for e in events if isinstance(e, Sample)]
        return Result(h.name, [self._result(pairs, h, i) for i in ids], samples)

    def _accept(
        self, pairs: PairStore, events: Sequence[Sample | bytes], endpoint: str
    ) -> list[str]:
        ids = []
        now = time.time()
        for n, event in enumerate(events):
            body = event.body if isinstance(event, Sample) else event
            event_type = event.type if isinstance(event, Sample) else ""
            event_id = new_event_id()
            # As the ingress: the same body posted again is the same event (a retransmission).
            digest = hashlib.sha256(endpoint.encode() + b"\0" + body).hexdigest()
            record = event_record(endpoint, now + n / 1000, event_type, body)
            (first,) = pairs.accept([(dedup_key(digest), event_id, record)])
            ids.append(first or event_id)
        return ids

    def _drive(
        self,
        pairs: PairStore,
        dispatcher: Dispatcher,
        runner: HandlerRunner,
        h: Handler,
        ids: list[str],
        timeout_s: float,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._settled(pairs, h, ids):
            if time.monotonic() > deadline:
                states = {i: {p: s.state for p, s in pairs.states(i).items()} for i in ids}
                raise HarnessError(f"not settled within {timeout_s} s: {states}")
            worked = False
            for queue in (DISPATCH_QUEUE, h.queue):
                raw = self.client.rpop(queue)
                if not isinstance(raw, bytes):
                    continue
                worked = True
                kwargs = read_task_message(raw)[2]
                if queue == DISPATCH_QUEUE:
                    dispatcher.dispatch(kwargs["ids"], kwargs.get("seq"), run_here=[h.queue])
                else:
                    runner.run(kwargs["handler"], kwargs["ids"], kwargs.get("seq"), queue)
            if not worked:
                # Nothing runs between two steps here: a retry or a deferral due later (the
                # handler's own schedule, a Retry-After) is brought forward, not waited for.
                sweep_once(pairs, self.settings, now_s=self._next_due(ids, h))
                time.sleep(0.001)

    def _next_due(self, ids: list[str], h: Handler) -> float | None:
        """When the earliest of the run's pairs the sweep watches is due (s), if it is later
        than now; None to sweep at the present time."""
        members = [due_member(i, p) for i in ids for p in (DISPATCH_PAIR, h.name)]
        with self.client.pipeline(transaction=False) as pipe:
            for m in members:
                pipe.zscore(DUE, m)
            scores = [float(s) for s in pipe.execute() if s is not None]
        if not scores:
            return None
        return max(min(scores) / 1000 + 0.001, time.time())

    @staticmethod
    def _settled(pairs: PairStore, h: Handler, ids: list[str]) -> bool:
        for event_id in ids:
            states = pairs.states(event_id)
            dispatch = states.get("@dispatch")
            if dispatch is None or not dispatch.final:
                return False
            mine = states.get(h.name)
            if mine is not None and not mine.final:
                return False
        return True

    def _result(self, pairs: PairStore, h: Handler, event_id: str) -> PairResult:
        states = pairs.states(event_id)
        pair = states.get(h.name)
        entries = [
            e
            for e in Trail(self.client, self.settings.trail_keep_s).read(event_id)
            if e.get("what") == "handler" and e.get("handler") == h.name
        ]
        ran = [e for e in entries if e.get("outcome") not in ("deferred", "held")]
        dead = RecordStore(self.client, DEAD).get(f"{event_id}.{h.name}", with_body=False)
        if pair is None:
            # Not routed to it: parked (a type it does not take, a payload that fails its
            # schema); the dispatch's state says so.
            dispatch = states.get("@dispatch")
            state = dispatch.state if dispatch is not None else "unknown"
            return PairResult(event_id, state, 0, 0, (), ())
        return PairResult(
            event_id,
            pair.state,
            pair.attempt,
            len(ran),
            tuple(str(e.get("outcome", "")) for e in ran),
            tuple(str(e["error"]) for e in ran if e.get("error")),
            dead,
        )


def find(handler: Handler | Callable[..., Any] | str) -> Handler:
    """The registered handler meant by ``handler``: itself, its function, or its name; one that
    is registered but not enabled with the current settings is found too."""
    if isinstance(handler, Handler):
        return handler
    candidates: list[Handler] = [*registry, *(h for h, _ in registry.inactive.values())]
    for h in candidates:
        if h.name == handler or h.fn is handler:
            return h
    raise HarnessError(
        f"{handler!r} is not a registered handler: decorate it with @handler(...) and import "
        f"its module first"
    )
