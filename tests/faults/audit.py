"""The soak's plan of events, and its audit of the store once everything has settled.

Each planned event has a kind, which says which handlers dispatch must reach and how each of
those pairs may end. The audit reads every accepted event's pairs (``PairStore.states``), its
trail, the dead-letter and parked records, the bodies left in Redis, and the runs and effects
the test handlers recorded, and counts each way things can go wrong, by name (:data:`PROBLEMS`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from calhook.store.keys import (
    BODY,
    DEAD_STATE,
    DISPATCH_PAIR,
    DONE,
    DUE,
    OPEN_STATES,
    PARKED_STATE,
    STALE,
    UNACKED,
    order_key,
    pairs_key,
    trail_key,
)
from calhook.store.pairs import PairState
from calhook.store.records import DEAD, PARKED, RecordStore
from tests.faults.rig import Rig
from tests.support.chaos import ORDERED_HANDLER, ORDERED_TYPE, TRANSIENT_TYPE, applied_versions
from tests.support.recording import FLAKY_TYPE, PERMANENT_TYPE
from tests.support.worker import TEST_ENV

MAX_STARTS = int(TEST_ENV["CALHOOK_MAX_DELIVERIES"])
ATTEMPTS = len(TEST_ENV["CALHOOK_RETRY_SCHEDULE_S"].split(",")) + 1
QUEUES = ("dispatch", "audit", "record", "ordered")
UNKNOWN_TYPE = "soak.unheard_of"
PROBLEMS = (
    "lost",  # an accepted event, or a pair it was routed to, not final (or not there at all)
    "doubled",  # an effect applied twice, or done recorded twice, for one (event, handler)
    "stale",  # an ordered entity whose applied version is not the newest of its events
    "stuck",  # a pair counted open, an entry left in calhook:due
    "false poison",  # a poison dead letter for a handler that did not kill its worker that often
    "wrong end",  # a pair final in a state (or for a reason) its handler's behaviour rules out
    "body kept",  # a body in Redis that no dead letter or parked record needs
    "body missing",  # a dead letter or parked record whose body is gone (it cannot be replayed)
    "overlapping runs",  # an outcome the store refused: another run of the pair overlapped it
    "replayed twice though fixed",  # a dead letter both replays queued, though one fixed it
    "run again without a fault",  # a pair run more often than planned, with no fault near its runs
)
# How long before a fault a run may have begun and still be cut by it: the longest run here (the
# ordered sleeper's 3 s; the in-call retries of a transient failure take up to 2 s).
REACH_S = 3.0
_HANDLERS = {
    "lead": ("audit", "record"),
    "flaky": ("flaky",),
    "transient": ("transient",),
    "permanent": ("permanent",),
    "poison": ("poison",),
    "ordered": (ORDERED_HANDLER,),
    "unknown": (),
}
DEAD_REASON = {"flaky": "exhausted", "permanent": "permanent", "poison": "poison"}


@dataclass(frozen=True)
class Planned:
    """One event of the soak: its kind, its type and data (the rig adds a serial number)."""

    kind: str
    event_type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def handlers(self) -> tuple[str, ...]:
        """The handlers dispatch must route it to."""
        return _HANDLERS[self.kind]

    @property
    def fails(self) -> int:
        return int(self.data.get("fail_times", 0))

    @property
    def fixed_by_replay(self) -> bool:
        """Outlasts the schedule once, and succeeds within the attempts of one replay."""
        return self.kind == "flaky" and ATTEMPTS <= self.fails < 2 * ATTEMPTS

    def may_end(self, state: str) -> bool:
        """Whether its handler pairs may end in ``state`` (after one replay of each dead letter)."""
        if self.kind == "flaky":
            return state == (DONE if self.fails < 2 * ATTEMPTS else DEAD_STATE)
        if self.kind in ("permanent", "poison"):
            return state == DEAD_STATE
        if self.kind == "ordered":
            return state in (DONE, STALE)
        return state == DONE

    def runs(self, state: str, replayed: int) -> int:
        """How often its handler runs when no fault cuts a run."""
        if self.kind == "flaky":
            return self.fails + 1 if state == DONE else ATTEMPTS * (1 + replayed)
        if self.kind == "transient":
            return self.fails + 1
        if self.kind == "permanent":
            return 1 + replayed
        if self.kind == "poison":
            return MAX_STARTS * (1 + replayed)
        return 1 if state == DONE else 0


def ordered(entity: str, v: int, sleep_s: float = 0.0) -> Planned:
    """Version ``v`` of ``entity`` for ``ordered_apply``, which sleeps ``sleep_s`` first."""
    return Planned("ordered", ORDERED_TYPE, {"entity": entity, "v": v, "sleep_s": sleep_s})


def plan(rng: random.Random, n: int, entities: int = 60) -> list[Planned]:
    """``n`` events in random order: leads, handler faults (transient, retried on schedule,
    permanent, outlasting the schedule), versions of ``entities`` ordered entities, and a few
    that nobody handles."""
    events: list[Planned] = []
    for _ in range(n):
        x = rng.random()
        if x < 0.44:
            events.append(Planned("lead", "lead.created"))
        elif x < 0.60:
            fails = rng.choice([0, 1, 1, 2, 2, ATTEMPTS + 1, ATTEMPTS + 1, 10 * ATTEMPTS])
            events.append(Planned("flaky", FLAKY_TYPE, {"fail_times": fails}))
        elif x < 0.63:
            # Within the in-call quick retries (two), or past them into the schedule.
            fails = rng.choice([1, 2, 4])
            events.append(Planned("transient", TRANSIENT_TYPE, {"fail_times": fails}))
        elif x < 0.67:
            events.append(Planned("permanent", PERMANENT_TYPE))
        elif x < 0.99:
            events.append(ordered(f"c{rng.randrange(entities)}", 0))
        else:
            events.append(Planned("unknown", UNKNOWN_TYPE))
    # Each entity's versions, in an order unrelated to the order they are posted in.
    by_entity: dict[str, list[int]] = {}
    for i, p in enumerate(events):
        if p.kind == "ordered":
            by_entity.setdefault(p.data["entity"], []).append(i)
    for entity, where in by_entity.items():
        versions = [1000 + k for k in range(len(where))]
        rng.shuffle(versions)
        for i, v in zip(where, versions, strict=True):
            events[i] = ordered(entity, v, sleep_s=rng.choice([0.0, 0.0, 0.0, 0.02]))
    return events


@dataclass
class Faults:
    """When the test cut runs short, in wall-clock time (the handlers log their runs' starts in
    it). A run that began at most :data:`REACH_S` before a kill, or before an outage ended
    (a lease after it: the lease of a run held up by the outage may run out), may have been cut
    by it and run again; the audit looks for the others."""

    origin: float = field(default_factory=time.time)
    windows: list[tuple[float, float]] = field(default_factory=list)

    def kill(self) -> None:
        """A process (a worker, a pool child) was killed just now."""
        now = time.time()
        self.windows.append((now - REACH_S, now))

    def outage(self, began: float, lease_s: float) -> None:
        """The broker was down from ``began`` until just now."""
        self.windows.append((began - REACH_S, time.time() + lease_s))

    def explain(self, start: float) -> bool:
        return any(a <= start <= b for a, b in self.windows)

    def since_origin(self, starts: list[float]) -> str:
        return ", ".join(f"{at - self.origin:.1f}s" for at in starts)


@dataclass
class Audit:
    """What the audit counted; ``examples`` names a few offenders of each problem; ``cut``, the
    pairs run more often than planned, by how many runs."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    cut: Counter[str] = field(default_factory=Counter)
    cut_at: list[str] = field(default_factory=list)  # a few of them, with when they ran

    def bad(self, problem: str, what: str) -> None:
        assert problem in PROBLEMS, problem
        self.counts[problem] += 1
        where = self.examples.setdefault(problem, [])
        if len(where) < 5:
            where.append(what)

    def report(self) -> str:
        problems = [f"  {p:<44} {self.counts[p]}" for p in PROBLEMS]
        seen = [f"  {k:<44} {v}" for k, v in sorted(self.counts.items()) if k not in PROBLEMS]
        lines = ["problems:", *problems, "what happened:", *seen]
        for problem, where in sorted(self.examples.items()):
            lines.append(f"  e.g. {problem}: {', '.join(where)}")
        if self.cut_at:
            lines += ["runs cut by a fault (s since the start), e.g.:", *self.cut_at]
        return "\n".join(lines)


def dead_letters(r: Rig) -> dict[str, dict[str, str]]:
    """Every dead letter, by id (without the body)."""
    return {rec["id"]: rec for rec in RecordStore(r.redis, DEAD).records(with_body=False)}


def check_poison(r: Rig, accepted: Mapping[str, Planned], audit: Audit, when: str) -> None:
    """A poison dead letter only for the handler that kills its worker, once per start."""
    runs = r.runs()
    for record_id, rec in dead_letters(r).items():
        if rec.get("reason") != "poison":
            continue
        planned = accepted.get(rec["event_id"])
        killed = runs[f"{rec['event_id']}:{rec['handler']}"]
        if planned is None or planned.kind != "poison" or killed < MAX_STARTS:
            audit.bad("false poison", f"{record_id} ({when}, {killed} runs)")


def audit_store(
    r: Rig, accepted: Mapping[str, Planned], replays: Counter[str], faults: Faults
) -> Audit:
    """Classify every pair of every accepted event, then look for anything left behind and
    for runs no fault explains (``faults``: the test's; a poison handler's runs kill too)."""
    audit = Audit()
    audit.counts["events accepted"] = len(accepted)
    dead = dead_letters(r)
    parked = set(RecordStore(r.redis, PARKED).ids(limit=100_000))
    newest: dict[str, tuple[int, str]] = {}
    ids = list(accepted)
    seen = Seen(r.runs(), r.effects(), dead, parked, replays)
    for event_id, oks in zip(ids, _dones_in_trails(r, ids), strict=True):
        planned = accepted[event_id]
        audit.counts[f"events {planned.kind}"] += 1
        _check_event(r, audit, event_id, planned, oks, seen)
        if planned.kind == "ordered":
            entity, v = str(planned.data["entity"]), int(planned.data["v"])
            newest[entity] = max(newest.get(entity, (v, event_id)), (v, event_id))
    _check_order(r, newest, audit)
    check_poison(r, accepted, audit, "at the end")
    _check_cuts(r, audit, faults)
    _check_bodies(r, dead, parked, audit)
    _check_settled(r, audit)
    audit.counts.update(Counter(f"dead letters at the end: {d['reason']}" for d in dead.values()))
    return audit


@dataclass(frozen=True)
class Seen:
    """What the audit reads once: runs and effects per pair, the records, the replays."""

    runs: Counter[str]
    effects: Counter[str]
    dead: dict[str, dict[str, str]]
    parked: set[str]
    replays: Counter[str]


def _check_event(
    r: Rig, audit: Audit, event_id: str, planned: Planned, oks: Counter[str], seen: Seen
) -> None:
    runs, effects, parked = seen.runs, seen.effects, seen.parked
    states = r.states(event_id)
    dispatch = states.get(DISPATCH_PAIR)
    want = PARKED_STATE if planned.kind == "unknown" else DONE
    if dispatch is None or not dispatch.final:
        audit.bad("lost", f"{event_id}/{DISPATCH_PAIR} {dispatch.state if dispatch else 'absent'}")
    elif dispatch.state != want or (want == PARKED_STATE and event_id not in parked):
        audit.bad("wrong end", f"{event_id}/{DISPATCH_PAIR} {dispatch.state}")
    for handler in planned.handlers:
        pair = f"{event_id}:{handler}"
        state: PairState | None = states.get(handler)
        if state is None or not state.final:
            audit.bad("lost", f"{pair} {state.state if state else 'absent'}")
            continue
        audit.counts[f"pairs {state.state}"] += 1
        audit.counts["done recorded in trails"] += oks[handler]
        reason = seen.dead.get(f"{event_id}.{handler}", {}).get("reason", "")
        if not planned.may_end(state.state):
            audit.bad("wrong end", f"{pair} {state.state} ({planned.kind} {planned.data})")
        elif state.state == DEAD_STATE and reason != DEAD_REASON.get(planned.kind):
            audit.bad("wrong end", f"{pair} dead ({reason})")
        if effects[pair] > 1 or oks[handler] > 1:
            audit.bad("doubled", f"{pair} effect {effects[pair]}x, done {oks[handler]}x")
        elif handler != "audit" and effects[pair] != (state.state == DONE):
            audit.bad("wrong end", f"{pair} {state.state} with {effects[pair]} effects")
        replayed = seen.replays[f"{event_id}.{handler}"]
        if replayed > 1 and planned.fixed_by_replay:
            audit.bad("replayed twice though fixed", pair)
        if handler != "audit":
            expected = planned.runs(state.state, replayed)
            if cut := max(runs[pair] - expected, 0):
                audit.cut[pair] = cut
                audit.counts["runs cut by a fault and run again"] += cut
                audit.counts[f"runs cut by a fault and run again: {handler}"] += cut


def _check_cuts(r: Rig, audit: Audit, faults: Faults) -> None:
    """Each run beyond the plan's began where a fault may have cut it."""
    starts = r.run_starts()
    for pair, runs in starts.items():
        if pair.endswith(":poison"):
            faults.windows += [(at - REACH_S, at) for at in runs]
    for pair, cut in sorted(audit.cut.items()):
        explained = sum(1 for at in starts.get(pair, []) if faults.explain(at))
        where = faults.since_origin(starts.get(pair, []))
        if explained < cut:
            audit.bad("run again without a fault", f"{pair}: {cut} more than planned, at {where}")
        elif len(audit.cut_at) < 8:
            audit.cut_at.append(f"  {pair}: {cut} more than planned, runs at {where}")


def _dones_in_trails(r: Rig, ids: list[str]) -> list[Counter[str]]:
    """Per event, how often each handler's trail entry says its run ended ``ok``."""
    with r.redis.pipeline(transaction=False) as pipe:
        for event_id in ids:
            pipe.lrange(trail_key(event_id), 0, -1)
        trails: list[list[bytes]] = pipe.execute()
    found = []
    for entries in trails:
        oks: Counter[str] = Counter()
        for raw in entries:
            if b'"outcome":"ok"' in raw and b'"what":"handler"' in raw:
                # cjson writes the keys in any order; the handler's name is all this needs.
                oks[raw.split(b'"handler":"', 1)[1].split(b'"', 1)[0].decode()] += 1
        found.append(oks)
    return found


def _check_order(r: Rig, newest: dict[str, tuple[int, str]], audit: Audit) -> None:
    for entity, (v, event_id) in newest.items():
        audit.counts["ordered entities"] += 1
        committed = r.redis.hget(order_key(ORDERED_HANDLER, f"soak:{entity}"), "event_id")
        applied = applied_versions(r.redis, entity)
        if committed != event_id.encode() or not applied or applied[-1] != v:
            audit.bad("stale", f"{entity}: newest v{v}, applied last {applied[-3:]}")
        elif applied != sorted(applied):
            audit.bad("stale", f"{entity}: an older version applied after a newer, {applied}")


def _check_bodies(r: Rig, dead: dict[str, dict[str, str]], parked: set[str], audit: Audit) -> None:
    needed = {rec["event_id"] for rec in dead.values()} | parked
    bodies = {key.decode().removeprefix(BODY) for key in r.redis.scan_iter(f"{BODY}*", 1000)}
    audit.counts["bodies in redis"] = len(bodies)
    for event_id in sorted(bodies - needed):
        audit.bad("body kept", event_id)
    for event_id in sorted(needed - bodies):
        audit.bad("body missing", event_id)


def _check_settled(r: Rig, audit: Audit) -> None:
    for state in OPEN_STATES:
        for queue, n in r.counts(pairs_key(state)).items():
            if n:
                audit.bad("stuck", f"{pairs_key(state)} {queue}={n}")
    if left := r.redis.zcard(DUE):
        audit.bad("stuck", f"{left} entries in {DUE}")
    # Copies that will run nothing: kombu hands a killed worker's unacked messages back only
    # after the visibility timeout, on a scan every 100 s.
    audit.counts["messages left on queues (copies)"] = sum(int(r.redis.llen(q)) for q in QUEUES)
    audit.counts["messages left unacked (copies)"] = int(r.redis.hlen(UNACKED))


def from_logs(r: Rig) -> Counter[str]:
    """What the workers and schedulers said they did (no-op copies, recoveries, kills)."""
    seen: Counter[str] = Counter()
    for line in r.lines("due"):
        seen["sweep: retries and waits queued when due"] += int(line["queued"])
    for line in r.lines("recovered"):
        seen["sweep: runs of dead workers queued again"] += int(line["expired"])
        seen["sweep: messages lost in transit queued again"] += int(line["lost"])
    for line in r.lines("not run") + r.lines("not dispatched"):
        seen[f"copies that ran nothing ({line['why']})"] += 1
    seen["ordered pairs deferred (entity locked)"] = len(r.lines("waits for its entity"))
    seen["'lease lost' warnings"] = sum(len(line["pairs"]) for line in r.lines("lease lost"))
    for worker in r.workers:
        for line in worker.lines():
            msg = str(line.get("msg", ""))
            if msg.startswith("outcome not recorded"):
                seen["outcomes refused"] += 1
            elif "cannot be acknowledged after a connection loss" in msg:
                seen["runs terminated on the broker connection loss"] += 1
            elif msg.startswith("Task handler raised error: WorkerLostError"):
                seen["pool children lost mid-task (WorkerLostError)"] += 1
    return seen
