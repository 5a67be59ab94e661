"""Each event's pairs as one state machine, each transition one script (``lua/``).

A pair is (event, handler), or the event's dispatch. Its states::

    queued ──start──▶ running ──done──▶ done | stale
       ▲                 │ ──retry / defer──▶ waiting ──(due: sweep)──▶ queued
       │                 └──dead (permanent, exhausted, poison)──▶ dead ──replay──▶ queued
       └──(lease ran out, or the message was lost: sweep)
    queued ──(its handler paused, or its breaker open)──▶ held ──(release)──▶ queued

A run owns its pair through a lease (an owner token and a deadline) that the worker's heartbeat
renews; a second copy of a message finds the pair running, done or dead and runs nothing. Every
recovery (a due retry, a dead worker, a lost message) is :meth:`PairStore.sweep`, which queues
one message per pair and nothing while an equivalent message is pending.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from calhook.store.keys import (
    FINAL_STATES,
    event_key,
)
from calhook.store.scripts import AsyncScripts, Scripts
from calhook.store.stats import bucket_of


class ReplayError(Exception):
    """Raised when a record to replay does not exist, or its body is gone."""


@dataclass(frozen=True, slots=True)
class Started:
    """What starting one event's attempt came to; ``run`` is True when the caller runs it."""

    event_id: str
    what: str
    attempt: int = 0
    body: str = ""
    endpoint: str = ""
    received_at: float = 0.0
    type: str = ""
    version: str = ""

    @property
    def run(self) -> bool:
        """Whether this run owns the attempt and must run it now."""
        return self.what == "run"

    @property
    def pending(self) -> bool:
        """Whether this run still has to start it, on its own or after an older event."""
        return self.what in ("suspect", "later")

    @property
    def order(self) -> tuple[int, int, str]:
        """Where a pending event's version stands (``workers.ordering.Version.order``)."""
        created, _, rest = self.version.partition("|")
        kind, _, event_id = rest.partition("|")
        if not created:
            return (0, 0, self.event_id)
        return (int(created), int(kind), event_id)


@dataclass(frozen=True, slots=True)
class Ending:
    """How one started attempt ended: ``do`` is done, retry, defer or dead; a retry or a
    deferral runs again ``delay_s`` from now."""

    event_id: str
    do: str
    outcome: str
    fields: dict[str, Any] = field(default_factory=dict)
    delay_s: float | None = None
    duration_s: float | None = None
    reason: str = ""
    error: str = ""
    traceback: str = ""
    # What one more event adds to a batch of this handler (s): its duration for a sync handler,
    # 0 for an async one; how many events the handler's messages name follows it.
    cost_s: float | None = None
    # A failure's error text scrubbed of personal data (its failure group shows it).
    gist: str = ""
    # A transient failure: its circuit's breaker, as finish.lua's breaker_failure reads it.
    breaker: dict[str, Any] | None = None

    def encode(self, pair: str | None = None, throughput_key: str | None = None) -> bytes:
        """As ``finish.lua`` reads it; ``pair`` and ``throughput_key`` when one call records
        the endings of several runs."""
        entry: dict[str, Any] = {"id": self.event_id, "do": self.do, "outcome": self.outcome}
        if pair is not None:
            entry["pair"] = pair
        if throughput_key is not None:
            entry["tp"] = throughput_key
        if self.fields:
            entry["fields"] = self.fields
        if self.delay_s is not None:
            # A delay, not a time: the script adds it to Redis's clock, whatever this host's says.
            entry["delay"] = max(int(self.delay_s * 1000), 0)
        if self.duration_s is not None:
            entry["bucket"] = bucket_of(self.duration_s)
            entry["dur"] = self.duration_s
        if self.cost_s is not None:
            entry["cost"] = round(self.cost_s, 6)
        if self.do == "dead":
            entry["reason"] = self.reason
            entry["traceback"] = self.traceback
        if self.error:
            entry["error"] = self.error
        if self.gist:
            entry["gist"] = self.gist
        if self.breaker is not None:
            entry["brk"] = self.breaker
        return orjson.dumps(entry)


@dataclass(frozen=True, slots=True)
class Route:
    """Dispatch's decision for one event: its handlers (name, queue, order entity, version and
    'async' for an async handler), or the reason it is parked."""

    event_id: str
    type: str
    received: bytes
    handlers: Sequence[tuple[str, ...]] = ()
    park_reason: str = ""
    park_errors: Sequence[dict[str, str]] = ()
    # Pairs added to an event dispatched elsewhere (calhook 0.1), with the body it carried.
    add_body: str | None = None

    def encode(self) -> bytes:
        if self.add_body is not None:
            route = [list(h) for h in self.handlers]
            return orjson.dumps(
                {"id": self.event_id, "add": True, "body": self.add_body, "route": route}
            )
        entry: dict[str, Any] = {
            "id": self.event_id,
            "type": self.type,
            "received": self.received.decode(),
        }
        if self.park_reason:
            entry["park"] = {
                "reason": self.park_reason,
                "errors": orjson.dumps(list(self.park_errors)).decode(),
            }
        else:
            entry["route"] = [list(h) for h in self.handlers]
        return orjson.dumps(entry)


@dataclass(frozen=True, slots=True)
class Swept:
    """What one sweep did."""

    due: int
    expired: int
    lost: int
    pending: int
    dropped: int
    recovered: tuple[str, ...]

    @property
    def queued(self) -> int:
        """Messages' worth of pairs queued by this sweep."""
        return self.due + self.expired + self.lost

    @property
    def looked_at(self) -> int:
        return self.due + self.expired + self.lost + self.pending + self.dropped


@dataclass(frozen=True, slots=True)
class PairState:
    """One pair as stored (for ``calhook events show``, the audit, the tests)."""

    pair: str
    state: str
    attempt: int
    queue: str
    starts: int
    lease_until_s: float | None
    due_s: float | None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def started_rows(event_ids: Sequence[str], rows: Sequence[Any]) -> list[Started]:
    """``start.lua``'s answer, per event."""
    started = []
    for event_id, row in zip(event_ids, rows, strict=True):
        what = _text(row[0])
        if what == "run":
            started.append(
                Started(
                    event_id,
                    what,
                    int(row[1]),
                    _text(row[2]),
                    _text(row[3]),
                    float(row[4]),
                    _text(row[5]),
                )
            )
        elif len(row) > 1:
            started.append(Started(event_id, what, version=_text(row[1])))
        else:
            started.append(Started(event_id, what))
    return started


class PairStore:
    """The transitions of pairs, on one synchronous client."""

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts
        self.client = scripts.client

    def accept(
        self,
        events: Sequence[tuple[str, str, bytes]],
        dedup_ttl_s: int = 48 * 3600,
        *,
        queue_dispatch: bool = True,
    ) -> list[str | None]:
        """Store events as the ingress does (``accept.lua``): ``(dedup key, event id, record)``
        each, the record from :func:`calhook.messages.event_record`. Per event None once
        stored, or the first id of a duplicate. ``queue_dispatch=False``: the caller starts
        the dispatch itself. For tools, upgrades and tests; the ingress is async."""
        keys = [key for key, _, _ in events]
        args: list[Any] = [dedup_ttl_s, 0 if queue_dispatch else 1]
        for _, event_id, record in events:
            args += (event_id, record)
        return [_text(r) if r else None for r in self.scripts.call("accept", args, keys)]

    def start(
        self,
        pair: str,
        event_ids: Sequence[str],
        owner: str,
        *,
        max_starts: int,
        seq: int | None,
        queue: str,
        defer_s: float,
        batch: bool = False,
        most: int = 0,
    ) -> list[Started]:
        """Start the attempts of ``event_ids`` for ``pair`` under ``owner``; one round trip.

        ``batch``: a run of many events (``lua/start.lua``): the messages of ``pair`` waiting
        next on ``queue`` join it while it has at most ``most`` events, and an event that may
        have killed an earlier run, or that follows an older one of its entity, is left for
        later (``suspect``, ``later``). The result covers ``event_ids`` and then the events
        taken from those messages.
        """
        taken, rows = self.scripts.call(
            "start",
            [
                pair,
                owner,
                max_starts,
                seq or "",
                queue,
                int(defer_s * 1000),
                "batch" if batch else "one",
                most,
                *event_ids,
            ],
        )
        return started_rows([*event_ids, *(_text(t) for t in taken)], rows)

    def finish(
        self, pair: str, owner: str, throughput_key: str, endings: Sequence[Ending]
    ) -> list[str]:
        """Record how the attempts ended; per event 'ok', 'late' or 'lost'. One round trip."""
        if not endings:
            return []
        raw = self.scripts.call(
            "finish", [pair, owner, throughput_key, *(e.encode() for e in endings)]
        )
        return [_text(r) for r in raw]

    def fan_out(
        self,
        throughput_key: str,
        batch_max: int,
        routes: Sequence[Route],
        run_here: Collection[str] = (),
    ) -> list[str]:
        """Route or park each event; per event 'ok' or 'late'. One round trip."""
        return self.fan_out_here(throughput_key, batch_max, routes, run_here)[0]

    def fan_out_here(
        self,
        throughput_key: str,
        batch_max: int,
        routes: Sequence[Route],
        run_here: Collection[str],
    ) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
        """:meth:`fan_out`, and the (handler, queue, event ids) of the handlers among
        ``run_here`` whose new pairs the caller runs itself (their queues were empty: no
        message is queued for them)."""
        raw, inline = self.scripts.call(
            "fan_out",
            [throughput_key, batch_max, ",".join(run_here), *(r.encode() for r in routes)],
        )
        groups = [(_text(g[0]), _text(g[1]), [_text(i) for i in g[2:]]) for g in inline]
        return [_text(r) for r in raw], groups

    def renew(self, owner: str, members: Iterable[str]) -> list[str]:
        """Extend the leases of ``members`` held by ``owner``; return those it no longer holds."""
        members = list(members)
        if not members:
            return []
        return [_text(m) for m in self.scripts.call("renew", [owner, *members])]

    def sweep(
        self, *, limit: int, batch_max: int, hold_s: float = 360.0, now_s: float | None = None
    ) -> Swept:
        """Queue what is due, expired or lost, once each; see ``lua/sweep.lua``. ``hold_s``: how
        long a live worker may hold a message it took before starting it."""
        raw = self.scripts.call("sweep", [limit, batch_max, int(hold_s * 1000)], now_s=now_s)
        due, expired, lost, pending, dropped = (int(x) for x in raw[:5])
        recovered = tuple(_text(m) for m in raw[5:])
        return Swept(due, expired, lost, pending, dropped, recovered)

    def replay(self, kind: str, record_id: str) -> str:
        """Queue the pair of a dead (``kind='dead'``) or parked record again; return its queue."""
        raw = self.scripts.call("replay", [kind, record_id])
        what = _text(raw[0])
        if what == "missing":
            label = "dead letter" if kind == "dead" else "parked event"
            raise ReplayError(f"no {label} {record_id} (replayed or purged already?)")
        if what == "no_body":
            raise ReplayError(f"the body of {record_id} has expired; purge the record")
        return _text(raw[1])

    def purge(
        self, kind: str, record_ids: Sequence[str], stored_before: float | None = None
    ) -> int:
        """Remove records (the body goes once nothing needs it); return how many were there.
        ``stored_before`` (the retention's cutoff) spares a record stored again since."""
        if not record_ids:
            return 0
        cutoff = "+inf" if stored_before is None else repr(stored_before)
        return int(self.scripts.call("purge", [kind, cutoff, *record_ids]))

    def forget(self, event_ids: Sequence[str]) -> tuple[int, int, int]:
        """Erase events with their open work and records: (events, open pairs, records)."""
        if not event_ids:
            return (0, 0, 0)
        erased, dropped, records = self.scripts.call("forget", list(event_ids))
        return int(erased), int(dropped), int(records)

    def states(self, event_id: str) -> dict[str, PairState]:
        """Every pair of the event, by pair name (the dispatch is ``@dispatch``)."""
        raw: dict[bytes, bytes] = self.client.hgetall(event_key(event_id))  # type: ignore[assignment]
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        pairs: dict[str, PairState] = {}
        for name, value in fields.items():
            pair, sep, what = name.rpartition("/")
            if not sep or what != "s":
                continue
            lease = fields.get(f"{pair}/l")
            due = fields.get(f"{pair}/t")
            pairs[pair] = PairState(
                pair,
                value,
                int(fields.get(f"{pair}/a", "1")),
                fields.get(f"{pair}/q", ""),
                int(fields.get(f"{pair}/n", "0")),
                int(lease) / 1000 if lease else None,
                int(due) / 1000 if due else None,
            )
        return pairs


class AsyncPairStore:
    """The transitions a worker's event loop makes (starting and finishing attempts), on an
    asyncio client: the same scripts as :class:`PairStore`."""

    def __init__(self, scripts: AsyncScripts) -> None:
        self.scripts = scripts

    async def finish_many(
        self, owner: str, endings: Sequence[tuple[str, str, Ending]]
    ) -> list[str]:
        """Record endings of any runs of ``owner``, each ``(pair, throughput key, ending)``; per
        ending 'ok', 'late' or 'lost' (:meth:`PairStore.finish`). One round trip."""
        if not endings:
            return []
        raw = await self.scripts.call(
            "finish", ["", owner, "", *(e.encode(pair, tp) for pair, tp, e in endings)]
        )
        return [_text(r) for r in raw]
