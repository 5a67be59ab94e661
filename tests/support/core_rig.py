"""A rig for driving the delivery core step by step: each "process" of a test (a worker, the
scheduler, an operator) gets a :class:`PairStore` whose clock reads a shared :class:`Timeline`
(plus its own skew), so "a lease later" is a number, not a sleep; a :class:`Worker` is one
worker process's runner, dispatcher and heartbeat on such a store, taking messages by hand.
Used by tests/workers/test_core_attacks.py and test_batches.py (database 14, out of the
session worker's reach; the fixtures are in tests/workers/conftest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from calhook.constants import DISPATCH_QUEUE
from calhook.ids import new_event_id
from calhook.messages import event_record, read_task_message
from calhook.settings import Settings
from calhook.store.connect import clock
from calhook.store.keys import (
    DEAD,
    DISPATCH_PAIR,
    DUE,
    HELD,
    HELD_STATE,
    OPEN_STATES,
    PARKED,
    body_key,
    dedup_key,
    due_member,
    duration_key,
    event_key,
    pairs_key,
)
from calhook.store.pairs import Ending, PairStore, Route
from calhook.store.queues import throughput_key
from calhook.store.scripts import Clock, Scripts
from tests.support import store
from workers.dispatch import Dispatcher
from workers.heartbeat import Heartbeat
from workers.registry import Handler, HandlerContext, Registry
from workers.runner import HandlerRunner

LEASE_S = 60.0
RECOVER_S = 60.0
CRM = ("crm.sync", "crm")
NOTIFY = ("notify.email", "notify")
ATTACK_TYPE = "test.attack"
DB = 14


# --- the clock of each process -------------------------------------------------------------


class Timeline:
    """The one real time of a test, in epoch seconds; each process reads it with its skew."""

    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t


@dataclass(frozen=True, slots=True)
class _TimelineClock(Clock):
    timeline: Timeline
    skew_s: float = 0.0

    def head(self, now_s: float | None = None) -> list[int | str]:
        return Clock.head(self, self.timeline.t + self.skew_s if now_s is None else now_s)


def process(
    db: redis.Redis, settings: Settings, timeline: Timeline, skew_s: float = 0.0
) -> PairStore:
    """The store as one process sees it: its clock is ``timeline`` + ``skew_s``."""
    c = clock(settings)
    timed = _TimelineClock(
        c.recover_s, c.lease_s, c.done_ttl_s, c.keep_ttl_s, c.trail_ttl_s, timeline, skew_s
    )
    return PairStore(Scripts(db, timed))


def start(
    core: PairStore, pair: str, ids: list[str], owner: str, queue: str, **kw: Any
) -> list[str]:
    started = core.start(
        pair,
        ids,
        owner,
        max_starts=kw.get("max_starts", 5),
        seq=kw.get("seq"),
        queue=queue,
        defer_s=kw.get("defer_s", 1.0),
    )
    return [s.what for s in started]


def finish(core: PairStore, owner: str, ending: Ending, handler: tuple[str, str] = CRM) -> str:
    return core.finish(handler[0], owner, throughput_key(handler[1]), [ending])[0]


def routed(
    core: PairStore,
    handlers: list[tuple[str, str]],
    entity: str = "",
    version: str = "",
    event_id: str | None = None,
) -> str:
    """An accepted event dispatched to ``handlers``; its handler messages are on their queues."""
    event_id = event_id or store.accept(core)
    assert start(core, DISPATCH_PAIR, [event_id], "dispatcher", DISPATCH_QUEUE) == ["run"]
    received = orjson.dumps({"at": time.time(), "what": "received"})
    route = Route(event_id, "x", received, [(h, q, entity, version) for h, q in handlers])
    assert core.fan_out(throughput_key(DISPATCH_QUEUE), 1, [route]) == ["ok"]
    return event_id


def accept_batch(core: PairStore, bodies: list[bytes], event_type: str = ATTACK_TYPE) -> list[str]:
    """Events accepted in one ingress batch: one dispatch message names them all."""
    ids = [new_event_id() for _ in bodies]
    events = []
    for event_id, body in zip(ids, bodies, strict=True):
        digest = hashlib.sha256(body + event_id.encode()).hexdigest()
        events.append(
            (dedup_key(digest), event_id, event_record("default", time.time(), event_type, body))
        )
    assert core.accept(events) == [None] * len(ids)
    return ids


def attack_body(**data: Any) -> bytes:
    return orjson.dumps({"type": ATTACK_TYPE, "created": "2025-05-01 10:00:00", "data": data})


def messages(db: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The kwargs of each message waiting on ``queue``, oldest (next taken) last."""
    return [read_task_message(m)[2] for m in db.lrange(queue, 0, -1)]


def copies(db: redis.Redis, queue: str, event_id: str) -> int:
    """How many messages waiting on ``queue`` name ``event_id``."""
    return sum(event_id in m["ids"] for m in messages(db, queue))


def take(db: redis.Redis, queue: str) -> dict[str, Any]:
    """What a worker gets from ``queue`` (BRPOP): the message's kwargs."""
    raw = db.rpop(queue)
    assert isinstance(raw, bytes), f"no message on {queue}"
    return read_task_message(raw)[2]


def state(core: PairStore, event_id: str, pair: str) -> str:
    found = core.states(event_id).get(pair)
    return found.state if found else ""


def later(s: float) -> float:
    return time.time() + s


def audit(db: redis.Redis) -> list[str]:
    """Every invariant of the store that can be read at rest, as a list of what is wrong."""
    problems: list[str] = []
    keys = sorted(db.scan_iter(f"{event_key('')}*", count=1000))
    ids = [k.decode().removeprefix(event_key("")) for k in keys]
    pipe = db.pipeline(transaction=True)
    for event_id in ids:
        pipe.hgetall(event_key(event_id))
        pipe.exists(body_key(event_id))
    pipe.zrange(DUE, 0, -1)
    pipe.zrange(DEAD, 0, -1)
    pipe.zrange(PARKED, 0, -1)
    for s in OPEN_STATES:
        pipe.hgetall(pairs_key(s))
    got = pipe.execute()
    counts = got[-len(OPEN_STATES) :]
    due, dead, parked = ({m.decode() for m in x} for x in got[2 * len(ids) : 2 * len(ids) + 3])
    records: Counter[str] = Counter(m.split(".", 1)[0] for m in dead)
    records.update(parked)
    actual: Counter[tuple[str, str]] = Counter()
    for n, event_id in enumerate(ids):
        fields = {k.decode(): v.decode() for k, v in got[2 * n].items()}
        opened = 0
        for name, value in fields.items():
            pair, sep, what = name.rpartition("/")
            if not sep or what != "s":
                continue
            if value in OPEN_STATES:
                opened += 1
                actual[(value, fields.get(f"{pair}/q", ""))] += 1
                if value == HELD_STATE:
                    # Held pairs wait in held:<handler> (the release queues them), never due.
                    if db.zscore(f"{HELD}{pair}", event_id) is None:
                        problems.append(f"{event_id}/{pair} is held without an entry in {HELD}")
                    if due_member(event_id, pair) in due:
                        problems.append(f"{event_id}/{pair} is held and due")
                elif due_member(event_id, pair) not in due:
                    problems.append(f"{event_id}/{pair} is {value} without an entry in {DUE}")
        if int(fields.get("open", "0")) != opened:
            problems.append(f"{event_id}: open={fields.get('open')} but {opened} pairs are open")
        keep = int(fields.get("keep", "0"))
        if keep != records[event_id]:
            problems.append(f"{event_id}: keep={keep} but {records[event_id]} records")
        has_body = bool(got[2 * n + 1])
        if has_body != (opened > 0 or records[event_id] > 0):
            problems.append(
                f"{event_id}: body {has_body} with {opened} open pairs, {records[event_id]} records"
            )
    # Nothing but a held pair waits in a held set (the release would queue it again).
    for key in db.scan_iter(f"{HELD}*", count=1000):
        pair = key.decode().removeprefix(HELD)
        members: list[bytes] = db.zrange(key, 0, -1)  # type: ignore[assignment]
        for member in members:
            state = db.hget(event_key(member.decode()), f"{pair}/s")
            if state != HELD_STATE.encode():
                problems.append(f"{member.decode()}/{pair} is in {HELD}{pair} but {state!r}")
    for s, raw in zip(OPEN_STATES, counts, strict=True):
        stored = {q.decode(): int(v) for q, v in raw.items()}
        for queue in set(stored) | {q for st, q in actual if st == s}:
            if stored.get(queue, 0) < 0:
                problems.append(f"pairs:{s} {queue} = {stored[queue]} < 0")
            if stored.get(queue, 0) != actual[(s, queue)]:
                problems.append(
                    f"pairs:{s} {queue} = {stored.get(queue)}, really {actual[(s, queue)]}"
                )
    return problems


class Worker:
    """One worker process: its store (on the test's timeline), heartbeat, runner, dispatcher.
    Its heartbeat thread never beats inside a test (a third of a minute); :meth:`beat` is it."""

    def __init__(
        self, db: redis.Redis, pairs: PairStore, registry: Registry, settings: Settings
    ) -> None:
        self.db = db
        self.pairs = pairs
        self.heartbeat = Heartbeat(pairs, settings.lease_s)
        self.runner = HandlerRunner(pairs, registry, self.heartbeat, settings)
        self.dispatcher = Dispatcher(
            pairs,
            registry,
            self.heartbeat,
            settings.zone,
            max_starts=settings.max_deliveries,
            batch_max=settings.batch_max,
            runner=self.runner,
        )

    def beat(self) -> list[str]:
        """One beat of the heartbeat: renew what this process holds right now."""
        held = sorted(self.heartbeat._held)
        return self.pairs.renew(self.heartbeat.owner, held)

    def take(self, queue: str, run_here: Sequence[str] = ()) -> dict[str, str]:
        """Take the next message of ``queue`` and run it as the Celery task would, in a worker
        that consumes ``queue`` and the handler queues ``run_here``."""
        kwargs = take(self.db, queue)
        if queue == DISPATCH_QUEUE:
            routed_ = self.dispatcher.dispatch(kwargs["ids"], kwargs["seq"], run_here=run_here)
            return {e: ",".join(h) for e, h in routed_.items()}
        return self.runner.run(kwargs["handler"], kwargs["ids"], kwargs["seq"], queue)

    def stop(self) -> None:
        self.heartbeat.stop()
        self.runner.close()


def attack_registry(*handlers: Handler) -> Registry:
    registry = Registry()
    for h in handlers:
        registry.register(h)
    return registry


def attack_handler(name: str, fn: Callable[[Any, HandlerContext], Any], **kw: Any) -> Handler:
    return Handler(name, frozenset({ATTACK_TYPE}), kw.pop("queue", "attack"), fn, **kw)


@contextlib.contextmanager
def worker_of(
    db: redis.Redis, settings: Settings, timeline: Timeline, *handlers: Handler
) -> Iterator[Worker]:
    """A :class:`Worker` serving ``handlers`` on the test's timeline, stopped afterwards."""
    worker = Worker(db, process(db, settings, timeline), attack_registry(*handlers), settings)
    try:
        yield worker
    finally:
        worker.stop()


def known_fast(db: redis.Redis, *handlers: str) -> None:
    """As if ``handlers`` had run before, fast: their messages name up to the batch size (a
    handler of unknown cost starts with one event per message)."""
    for name in handlers:
        db.hset(duration_key(name), "cost", "0.00001")
