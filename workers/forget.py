"""Right to erasure: erase one customer's data from every store calhook keeps in Redis.

An event belongs to the customer when its raw body mentions the customer's uuid: a
``customer.*`` event as ``data.customer.uuid``, a booking inside the appointment or as
``data.customer``, a flat payload as ``appointment_customer_uuid`` or ``appointment.customer.uuid``.
A uuid names one thing only, so searching the body (decoded first when it hides characters
behind ``\\u`` escapes) finds every shape, and the types Calenso adds later, without a list of
field names to keep up to date.

What is searched, and what goes with a match:

- Bodies: parked and dead-letter records, retries in the delayed store, watchdog copies, task
  messages waiting on any queue (every Redis list, so a queue of a handler module this process
  does not load is searched too) and kombu's ``unacked`` hash (messages a worker took).
- Keyed by the customer: the order versions ``calhook:order:<scope>:customer:<uuid>`` (and of
  the appointments found in the customer's bodies).
- Keyed by the events found above: trails and their index entries, ledger outcomes and delivery
  counts, fan-out markers, dedup keys (a digest of the body), notification marks, the status
  page's recent failures.

Queued work for the customer is erased with the rest, so it is never done: the right to erasure
wins over delivery. The report counts it; the log says how many messages, never what they held.
A task a worker is running at that moment cannot be recalled; the body passes are repeated until
one finds nothing, which catches what such a task queued meanwhile.

Not reached: the ingress spools (files on the ingress hosts, drained into Redis within seconds
while Redis is up), events already handled (their bodies are gone; their trails and ledger entries
carry no personal data and expire with the retention), and the systems handlers wrote to.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from calhook.constants import KEY_PREFIX, WATCHDOG_KEY, WATCHDOG_MESSAGES_KEY
from schemas import parse_event
from workers.delayed import DUE_KEY as DELAYED_DUE_KEY
from workers.delayed import MESSAGES_KEY as DELAYED_MESSAGES_KEY
from workers.ledger import deliveries_key, ledger_key
from workers.stats import RECENT_FAILURES_KEY
from workers.stores import DEAD, PARKED, RecordStore
from workers.trail import INDEX_KEY as TRAIL_INDEX_KEY

log = logging.getLogger("calhook.forget")

# kombu's default names for messages a worker took and has not acked.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
_PAGE = 1000
_MAX_PASSES = 3

# The stores of the report, in the order it lists them.
STORES = (
    "parked",
    "dead_letters",
    "delayed",
    "watchdog",
    "queued",
    "unacked",
    "ordering",
    "trails",
    "ledger",
    "dispatch_markers",
    "dedup",
    "notify_marks",
    "recent_failures",
)
# Stores whose removal means work that will not be done.
WORK_STORES = ("delayed", "queued", "unacked")


class ForgetError(ValueError):
    """Raised when the customer id to forget is not a uuid."""


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What ``forget`` removed: counts per store and the ids of the customer's events."""

    customer_uuid: str
    removed: dict[str, int]
    event_ids: tuple[str, ...]
    passes: int

    @property
    def work_dropped(self) -> int:
        """Task messages and retries erased: work that will not be done."""
        return sum(self.removed[s] for s in WORK_STORES)

    @property
    def total(self) -> int:
        """Everything removed."""
        return sum(self.removed.values())

    def as_json(self) -> dict[str, Any]:
        """The report for scripts: ids and counts, never personal data."""
        return {
            "customer_uuid": self.customer_uuid,
            "removed": self.removed,
            "total": self.total,
            "work_dropped": self.work_dropped,
            "event_ids": list(self.event_ids),
            "passes": self.passes,
        }


def customer_uuid(value: str) -> str:
    """``value`` as a canonical lower-case uuid; a ForgetError if it is none.

    Guards the search: ``forget ""`` or ``forget 1`` would otherwise match every body.
    """
    try:
        return str(uuid.UUID(value.strip()))
    except (ValueError, AttributeError):
        raise ForgetError(f"{value!r} is not a customer uuid") from None


def mentions(body: str | bytes, needle: str) -> bool:
    """Whether ``body`` mentions ``needle`` (lower case), also behind JSON ``\\u`` escapes."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if needle in text.lower():
        return True
    if "\\u" not in text:
        return False
    try:
        plain = orjson.dumps(orjson.loads(text)).decode()
    except orjson.JSONDecodeError:
        return False
    return needle in plain.lower()


@dataclass(frozen=True, slots=True)
class _Task:
    """What forget needs of a queued task message: its decoded arguments and event."""

    arguments: str
    event_id: str | None
    body: str | None

    def mentions(self, needle: str) -> bool:
        """Whether the task's arguments mention ``needle``; the body is searched on its own,
        since escapes inside it stay escaped in the arguments' JSON."""
        return mentions(self.arguments, needle) or (
            self.body is not None and mentions(self.body, needle)
        )


def _task(message: Any) -> _Task | None:
    """Decode a kombu message (as stored in a queue, or the dict in ``unacked``)."""
    try:
        if not isinstance(message, dict):
            message = orjson.loads(message)
        raw = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            raw = base64.b64decode(raw)
        arguments = raw.decode() if isinstance(raw, bytes) else str(raw)
        decoded = orjson.loads(arguments)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error):
        return None
    kwargs = decoded[1] if isinstance(decoded, list) and len(decoded) > 1 else {}
    if not isinstance(kwargs, dict):
        kwargs = {}
    event_id, body = kwargs.get("event_id"), kwargs.get("body")
    return _Task(
        arguments,
        event_id if isinstance(event_id, str) else None,
        body if isinstance(body, str) else None,
    )


def _entry_task(stored: bytes) -> _Task | None:
    """Decode a delayed-store or watchdog entry, ``<queue>\\n<message>``."""
    _, _, message = stored.partition(b"\n")
    return _task(message)


@dataclass(slots=True)
class _Found:
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STORES, 0))
    event_ids: set[str] = field(default_factory=set)
    appointments: set[str] = field(default_factory=set)


class Forgetter:
    """Erases one customer from one Redis."""

    def __init__(self, client: redis.Redis, customer: str) -> None:
        self._redis = client
        self.customer = customer_uuid(customer)
        self._found = _Found()

    def run(self) -> ForgetReport:
        """Erase everything of the customer; return what was removed."""
        passes = 0
        while passes < _MAX_PASSES:
            passes += 1
            # Sources before destinations: a retry the scheduler moves to its queue meanwhile
            # was either seen in the delayed store or is on the queue when that is searched;
            # a message a worker takes meanwhile is in ``unacked`` when that is searched.
            found = (
                self._records(PARKED, "parked")
                + self._records(DEAD, "dead_letters")
                + self._entries(DELAYED_MESSAGES_KEY, DELAYED_DUE_KEY, "delayed")
                + self._entries(WATCHDOG_MESSAGES_KEY, WATCHDOG_KEY, "watchdog")
                + self._queues()
                + self._unacked()
            )
            if not found:
                break
        self._ordering()
        self._by_event()
        report = ForgetReport(
            self.customer,
            dict(self._found.removed),
            tuple(sorted(self._found.event_ids)),
            passes,
        )
        if report.work_dropped:
            # Counts only: what the messages held is exactly what must not reach a log.
            log.warning("forget dropped queued work", extra={"messages": report.work_dropped})
        log.info("forget done", extra={"removed": report.total, "events": len(report.event_ids)})
        return report

    def _matched(self, event_id: str | None, body: str | None) -> None:
        if event_id:
            self._found.event_ids.add(event_id)
        if body:
            self._found.appointments.update(_appointment_uuids(body))

    def _records(self, kind: str, name: str) -> int:
        store = RecordStore(self._redis, kind)
        matched: list[str] = []
        for batch in _batches(m for m, _ in self._redis.zscan_iter(store.index_key, count=_PAGE)):
            ids = [m.decode() for m in batch]
            with self._redis.pipeline(transaction=False) as pipe:
                for record_id in ids:
                    pipe.hmget(store.key(record_id), ["body", "event_id", "error", "traceback"])
                rows = pipe.execute()
            for record_id, (body, event_id, error, tb) in zip(ids, rows, strict=True):
                texts = [t for t in (body, error, tb) if t]
                if any(mentions(t, self.customer) for t in texts):
                    matched.append(record_id)
                    self._matched(_text(event_id), _text(body))
        with self._redis.pipeline(transaction=True) as pipe:
            for record_id in matched:
                store.remove(record_id, pipe)
            pipe.execute()
        self._found.removed[name] += len(matched)
        return len(matched)

    def _entries(self, messages_key: str, due_key: str, name: str) -> int:
        matched: list[bytes] = []
        for member, stored in self._redis.hscan_iter(messages_key, count=_PAGE):
            task = _entry_task(stored)
            if task is not None and task.mentions(self.customer):
                matched.append(member)
                self._matched(task.event_id, task.body)
        removed = self._remove_indexed(messages_key, due_key, matched)
        self._found.removed[name] += removed
        return removed

    def _queues(self) -> int:
        removed = 0
        for key in self._redis.scan_iter(count=_PAGE, _type="list"):
            if key.startswith(KEY_PREFIX.encode()):
                continue  # calhook's own lists (trails, recent failures) hold no task messages
            matched: set[bytes] = set()
            start = 0
            # Read the whole list, then remove by value: removals do not shift what is left
            # to read, and a message a worker took meanwhile is simply not removed here.
            while True:
                items: list[bytes] = self._redis.lrange(key, start, start + _PAGE - 1)  # type: ignore[assignment]
                if not items:
                    break
                for raw in items:
                    task = _task(raw)
                    if task is not None and task.mentions(self.customer):
                        matched.add(raw)
                        self._matched(task.event_id, task.body)
                start += _PAGE
            for raw in matched:
                removed += int(self._redis.lrem(key, 0, raw))  # type: ignore[arg-type]
        self._found.removed["queued"] += removed
        return removed

    def _unacked(self) -> int:
        matched: list[bytes] = []
        for tag, stored in self._redis.hscan_iter(UNACKED_KEY, count=_PAGE):
            try:
                message = orjson.loads(stored)[0]
            except (orjson.JSONDecodeError, IndexError, TypeError, KeyError):
                continue
            task = _task(message)
            if task is not None and task.mentions(self.customer):
                matched.append(tag)
                self._matched(task.event_id, task.body)
        removed = self._remove_indexed(UNACKED_KEY, UNACKED_INDEX_KEY, matched)
        self._found.removed["unacked"] += removed
        return removed

    def _remove_indexed(self, hash_key: str, index_key: str, members: list[bytes]) -> int:
        """Remove ``members`` from a hash and its sorted-set index; how many the hash had."""
        removed = 0
        for batch in _batches(members):
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(hash_key, *batch)
                pipe.zrem(index_key, *batch)
                deleted, _ = pipe.execute()
            removed += int(deleted)
        return removed

    def _ordering(self) -> None:
        """Order versions of the customer and of the appointments in the customer's events."""
        entities = {f":customer:{self.customer}"}
        entities |= {f":appointment:{a}" for a in self._found.appointments}
        doomed: list[bytes] = []
        for key in self._redis.scan_iter(match=f"{KEY_PREFIX}order:*", count=_PAGE):
            name = key.decode().lower().removesuffix(":lock")
            if any(name.endswith(entity) for entity in entities):
                doomed.append(key)
                if not key.endswith(b":lock"):
                    event_id = _text(self._redis.hget(key, "event_id"))
                    if event_id:
                        self._found.event_ids.add(event_id)
        if doomed:
            self._redis.delete(*doomed)
        self._found.removed["ordering"] += sum(1 for k in doomed if not k.endswith(b":lock"))

    def _by_event(self) -> None:
        """What is keyed by the customer's events: it carries no body, but it is theirs."""
        ids = sorted(self._found.event_ids)
        removed = self._found.removed
        for batch in _batches(ids):
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(*(f"{KEY_PREFIX}trail:{i}" for i in batch))
                pipe.zrem(TRAIL_INDEX_KEY, *batch)
                pipe.delete(*(ledger_key(i) for i in batch))
                pipe.delete(*(deliveries_key(i) for i in batch))
                pipe.delete(*(f"{KEY_PREFIX}dispatched:{i}" for i in batch))
                trails, indexed, ledgers, counts, markers = pipe.execute()
            removed["trails"] += max(int(trails), int(indexed))
            removed["ledger"] += int(ledgers) + int(counts)
            removed["dispatch_markers"] += int(markers)
        if not ids:
            return
        wanted = set(ids)
        self._dedup(wanted)
        self._notify_marks(wanted)
        self._recent_failures(wanted)

    def _dedup(self, wanted: set[str]) -> None:
        keys = self._redis.scan_iter(match=f"{KEY_PREFIX}dedup:*", count=_PAGE)
        for batch in _batches(keys):
            values = self._redis.mget(batch)
            doomed = [k for k, v in zip(batch, values, strict=True) if _text(v) in wanted]
            if doomed:
                self._found.removed["dedup"] += int(self._redis.delete(*doomed))

    def _notify_marks(self, wanted: set[str]) -> None:
        # calhook:notify:<sent|posted>:<event_id>:<handler>
        keys = self._redis.scan_iter(match=f"{KEY_PREFIX}notify:*", count=_PAGE)
        doomed = [k for k in keys if _event_of_mark(k) in wanted]
        if doomed:
            self._found.removed["notify_marks"] += int(self._redis.delete(*doomed))

    def _recent_failures(self, wanted: set[str]) -> None:
        entries: list[bytes] = self._redis.lrange(RECENT_FAILURES_KEY, 0, -1)  # type: ignore[assignment]
        for entry in entries:
            try:
                event_id = orjson.loads(entry).get("event_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if event_id in wanted:
                removed = int(self._redis.lrem(RECENT_FAILURES_KEY, 0, entry))  # type: ignore[arg-type]
                self._found.removed["recent_failures"] += removed


def forget_customer(client: redis.Redis, customer: str) -> ForgetReport:
    """Erase the customer ``customer`` (a uuid) from every store in Redis; what was removed."""
    return Forgetter(client, customer).run()


def _event_of_mark(key: bytes) -> str:
    parts = key.decode().split(":", 3)
    return parts[3].rpartition(":")[0] if len(parts) == 4 else ""


def _appointment_uuids(body: str) -> set[str]:
    """The appointment uuid of an appointment event, via the canonical model (any shape)."""
    try:
        event = parse_event(orjson.loads(body))
    except Exception:  # a body that does not parse has no appointment to find
        return set()
    appointment = getattr(event, "appointment", None)
    found = getattr(appointment, "uuid", None)
    return {found.lower()} if isinstance(found, str) and found else set()


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _batches(items: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= _PAGE:
            yield batch
            batch = []
    if batch:
        yield batch
