"""The day a destination is down: held handlers, circuit breakers and failure groups.

*Holding.* A handler paused by an operator (``calhook handlers pause``), or by the breaker of its
circuit, has its pairs held instead of run: no attempt is spent and nothing is dead-lettered.
Held pairs wait by when their event was received; once the handler resumes, the scheduler's
release (``lua/release.lua``) queues them oldest first at the handler's pace.

*The breaker.* A run of transient failures of a circuit (a handler, or the destination several
handlers share) within a window opens it: its handlers are held. It then lets one held pair
through at growing intervals (half-open); the first success closes it. A permanent error never
counts towards it.

*Failure groups.* Every failure joins the group of its (handler, error class, reason): a count,
first and last seen, a few sample event ids and the latest error text scrubbed of personal data.
A group of transient failures closes by itself at the handler's next success; an operator
acknowledges (it stays, without new notices) or resolves one.

Every transition of these is written to ``calhook:notices`` for :mod:`workers.notices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from calhook.store.keys import (
    BREAKER,
    BREAKERS,
    FAILURE_GROUP,
    FAILURE_GROUPS,
    HELD,
    HOLD,
    HOLDING,
    PAUSE,
)
from calhook.store.scripts import Scripts

OPERATOR = "operator"
GROUP_STATES = ("open", "acknowledged", "closed", "resolved")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


@dataclass(frozen=True, slots=True)
class Hold:
    """One handler that is held or has held events: by whom (``operator``, ``breaker``, or
    ``""`` while its held events are being released) and why."""

    handler: str
    by: str
    circuit: str
    reason: str
    since: float | None
    held: int
    oldest_at: float | None

    @property
    def paused(self) -> bool:
        return bool(self.by)


@dataclass(frozen=True, slots=True)
class Breaker:
    """A circuit's breaker while it is not closed (or counts failures)."""

    circuit: str
    state: str
    handlers: tuple[str, ...]
    failures: int
    error: str
    opened_at: float | None
    probe_at: float | None
    probes: int


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Failures of one (handler, error class, reason)."""

    id: str
    handler: str
    error: str
    reason: str
    state: str
    count: int
    first: float
    last: float
    samples: tuple[str, ...]
    message: str
    ended: float | None = None
    by: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "handler": self.handler,
            "error": self.error,
            "reason": self.reason,
            "state": self.state,
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "samples": list(self.samples),
            "message": self.message,
            "ended": self.ended,
            "by": self.by,
        }


@dataclass(frozen=True, slots=True)
class Released:
    """What one release did: probes let through (circuit, event/handler) and handlers' held
    events queued (handler, how many, how many are left)."""

    probes: tuple[tuple[str, str], ...] = ()
    released: tuple[tuple[str, int, int], ...] = ()


class HealthError(Exception):
    """An operator's action that cannot be done: no such group, a group already ended."""


class Health:
    """Holds, breakers and failure groups on one synchronous client."""

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts
        self.client: redis.Redis = scripts.client

    # --- holding ------------------------------------------------------------------------------

    def pause(self, handler: str, *, reason: str = "", by: str = OPERATOR) -> str:
        """Hold ``handler``; return what held it before (``""``, ``operator``, ``breaker:…``)."""
        raw = self.scripts.call("hold", ["pause", handler, by, reason])
        return _text(raw[1])

    def resume(self, handler: str, *, by: str = OPERATOR, rate_per_s: float | None = None) -> int:
        """Release ``handler`` (closing its breaker if that held it); return how many held events
        the release will queue. Raises HealthError if it was not held."""
        raw = self.scripts.call(
            "hold", ["resume", handler, by, "" if rate_per_s is None else repr(rate_per_s)]
        )
        if _text(raw[0]) == "not_paused":
            raise HealthError(f"{handler} is not paused")
        return int(raw[2])

    def holds(self) -> list[Hold]:
        """Every handler held, or with held events still to release, by name."""
        holds: dict[bytes, bytes] = self.client.hgetall(HOLD)  # type: ignore[assignment]
        names = {_text(h) for h in holds} | {_text(h) for h in self.client.smembers(HOLDING)}
        out = []
        for name in sorted(names):
            how = _text(holds.get(name.encode(), b""))
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(f"{PAUSE}{name}")
            pipe.zcard(f"{HELD}{name}")
            pipe.zrange(f"{HELD}{name}", 0, 0, withscores=True)
            why, held, first = pipe.execute()
            why = _decode(why)
            by, circuit = how, ""
            if how.startswith("breaker:"):
                by, circuit = "breaker", how.removeprefix("breaker:")
                breaker = self.breaker(circuit)
                reason = (
                    f"{breaker.failures} failures in a row ({breaker.error})" if breaker else ""
                )
                since = breaker.opened_at if breaker else None
            else:
                reason = why.get("reason", "")
                since = float(why["at"]) if "at" in why else None
                if how and why.get("by"):
                    by = why["by"]
            out.append(
                Hold(
                    name,
                    by,
                    circuit,
                    reason,
                    since,
                    int(held),
                    float(first[0][1]) if first else None,
                )
            )
        return out

    def release(
        self, *, rate_per_s: float, most: int, batch_max: int, tick_s: float = 1.0
    ) -> Released:
        """One step of the release (the scheduler's, once per tick of ``tick_s``)."""
        raw = self.scripts.call("release", [repr(rate_per_s), most, batch_max, int(tick_s * 1000)])
        probes, released = [], []
        for row in raw:
            if _text(row[0]) == "probe":
                probes.append((_text(row[1]), _text(row[2])))
            else:
                released.append((_text(row[1]), int(row[2]), int(row[3])))
        return Released(tuple(probes), tuple(released))

    # --- breakers -----------------------------------------------------------------------------

    def breaker(self, circuit: str) -> Breaker | None:
        """The breaker of ``circuit``, or None while it has seen no failure since its last
        success."""
        got = _decode(self.client.hgetall(f"{BREAKER}{circuit}"))  # type: ignore[arg-type]
        if not got:
            return None
        return Breaker(
            circuit,
            got.get("state", "closed"),
            tuple(h for h in got.get("handlers", "").split(",") if h),
            int(got.get("fails", "0")),
            got.get("error", ""),
            float(got["opened_at"]) if "opened_at" in got else None,
            int(got["probe_at"]) / 1000 if "probe_at" in got else None,
            int(got.get("probes", "0")),
        )

    def breakers(self) -> list[Breaker]:
        """Breakers open or probing, by circuit."""
        names = sorted(_text(c) for c in self.client.smembers(BREAKERS))
        return [b for b in (self.breaker(c) for c in names) if b is not None]

    # --- failure groups -----------------------------------------------------------------------

    def groups(
        self, states: Sequence[str] = ("open", "acknowledged"), limit: int = 100
    ) -> list[FailureGroup]:
        """Groups in ``states``, the most recently seen first."""
        ids = [_text(g) for g in self.client.zrevrange(FAILURE_GROUPS, 0, -1)]
        out: list[FailureGroup] = []
        for start in range(0, len(ids), 200):
            chunk = ids[start : start + 200]
            pipe = self.client.pipeline(transaction=False)
            for gid in chunk:
                pipe.hgetall(f"{FAILURE_GROUP}{gid}")
            gone = []
            for gid, raw in zip(chunk, pipe.execute(), strict=True):
                if not raw:
                    gone.append(gid)
                    continue
                group = _group(_decode(raw))
                if group.state in states:
                    out.append(group)
                    if len(out) >= limit:
                        return out
            if gone:
                self.client.zrem(FAILURE_GROUPS, *gone)
        return out

    def group(self, group_id: str) -> FailureGroup:
        got = _decode(self.client.hgetall(f"{FAILURE_GROUP}{group_id}"))  # type: ignore[arg-type]
        if not got:
            raise HealthError(f"no failure group {group_id}")
        return _group(got)

    def acknowledge(self, group_id: str, *, by: str = OPERATOR) -> None:
        self._group_action("acknowledge", group_id, by)

    def resolve(self, group_id: str, *, by: str = OPERATOR) -> None:
        self._group_action("resolve", group_id, by)

    def _group_action(self, action: str, group_id: str, by: str) -> None:
        raw = self.scripts.call("hold", [action, group_id, by, ""])
        what = _text(raw[0])
        if what == "missing":
            raise HealthError(f"no failure group {group_id}")
        if what == "ended":
            raise HealthError(f"failure group {group_id} is {_text(raw[1])} already")


def _group(got: dict[str, str]) -> FailureGroup:
    return FailureGroup(
        got.get("id", ""),
        got.get("handler", ""),
        got.get("error", ""),
        got.get("reason", ""),
        got.get("state", "open"),
        int(got.get("count", "0")),
        float(got.get("first", "0")),
        float(got.get("last", got.get("first", "0"))),
        tuple(orjson.loads(got.get("samples", "[]"))),
        got.get("message", ""),
        float(got["ended"]) if "ended" in got else None,
        got.get("by", ""),
    )
