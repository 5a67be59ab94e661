"""Right to erasure: erase one customer's data from every store calhook keeps in Redis.

An event belongs to the customer when its raw body mentions the customer's uuid: a
``customer.*`` event as ``data.customer.uuid``, a booking inside the appointment or as
``data.customer``, a flat payload as ``appointment_customer_uuid`` or ``appointment.customer.uuid``.
A uuid names one thing only, so searching the body (decoded first when it hides characters
behind ``\\u`` escapes) finds every shape, and the types Calenso adds later, without a list of
field names to keep up to date.

Bodies live in one place, ``calhook:body:<event id>``, from the ingress until every pair of the
event is final (longer only while a dead letter or a parked record needs it); task messages carry
event ids, never bodies. So forget searches the bodies (and the error texts of dead letters),
then erases each matching event in one transition (``store/lua/forget.lua``): its state and open
pairs, body, trail, dead letters and parked record. Then what is keyed by the customer (order
versions of the customer and of the appointments found in its bodies, with their locks) and by
its events (dedup keys, notification marks, the status page's recent failures).

Open work for the customer is erased with the rest, so it is never done: the right to erasure
wins over delivery. A message that still names an erased event finds nothing and runs nothing.
The report counts it; the log says how many pairs, never what they held. A handler running at
that moment cannot be recalled (its outcome is refused); the body pass is repeated until one
finds nothing, which catches an event accepted meanwhile.

Not reached: the ingress spools (files on the ingress hosts, drained into Redis within seconds
while Redis is up), events already handled (their bodies are gone; their states and trails carry
no personal data and expire), and the systems handlers wrote to.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from calhook.store.keys import BODY, DEDUP, NOTIFY, ORDER, RECENT_FAILURES
from calhook.store.pairs import PairStore
from calhook.store.records import DEAD, RecordStore
from schemas import parse_event

log = logging.getLogger("calhook.forget")

_PAGE = 1000
_MAX_PASSES = 3

# The stores of the report, in the order it lists them.
STORES = ("events", "open_work", "records", "ordering", "dedup", "notify_marks", "recent_failures")
# Stores whose removal means work that will not be done.
WORK_STORES = ("open_work",)


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
        """Open pairs erased (queued, running, waiting): work that will not be done."""
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


@dataclass(slots=True)
class _Found:
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STORES, 0))
    event_ids: set[str] = field(default_factory=set)
    appointments: set[str] = field(default_factory=set)


class Forgetter:
    """Erases one customer from one Redis."""

    def __init__(self, pairs: PairStore, customer: str) -> None:
        self._pairs = pairs
        self._redis = pairs.client
        self.customer = customer_uuid(customer)
        self._found = _Found()

    def run(self) -> ForgetReport:
        """Erase everything of the customer; return what was removed."""
        passes = 0
        while passes < _MAX_PASSES:
            passes += 1
            found = self._bodies() | self._dead_letters()
            if not found:
                break
            self._erase(found)
        # Handled events are found through the entities' order versions: their bodies are gone,
        # and their states keep no entity once final; their trails are erased with them.
        if handled := self._ordering() - self._found.event_ids:
            self._erase(handled)
        wanted = set(self._found.event_ids)
        if wanted:
            self._dedup(wanted)
            self._notify_marks(wanted)
            self._recent_failures(wanted)
        report = ForgetReport(
            self.customer,
            dict(self._found.removed),
            tuple(sorted(self._found.event_ids)),
            passes,
        )
        if report.work_dropped:
            # Counts only: what the work held is exactly what must not reach a log.
            log.warning("forget dropped open work", extra={"pairs": report.work_dropped})
        log.info("forget done", extra={"removed": report.total, "events": len(report.event_ids)})
        return report

    def _bodies(self) -> set[str]:
        found: set[str] = set()
        for batch in _batches(self._redis.scan_iter(match=f"{BODY}*", count=_PAGE)):
            for key, body in zip(batch, self._redis.mget(batch), strict=True):
                if body is not None and mentions(body, self.customer):
                    found.add(key.decode().removeprefix(BODY))
                    self._found.appointments.update(_appointment_uuids(_text(body) or ""))
        return found

    def _dead_letters(self) -> set[str]:
        # The body is searched above; an error text may quote the customer too.
        found: set[str] = set()
        for record in RecordStore(self._redis, DEAD).records(with_body=False):
            texts = (record.get("error", ""), record.get("traceback", ""))
            if any(t and mentions(t, self.customer) for t in texts):
                found.add(record["event_id"])
        return found

    def _erase(self, event_ids: set[str]) -> None:
        self._found.event_ids |= event_ids
        for batch in _batches(sorted(event_ids)):
            erased, dropped, records = self._pairs.forget(batch)
            self._found.removed["events"] += erased
            self._found.removed["open_work"] += dropped
            self._found.removed["records"] += records

    def _ordering(self) -> set[str]:
        """Erase the order versions of the customer and of the appointments in the customer's
        events; return the events they name."""
        entities = {f":customer:{self.customer}"}
        entities |= {f":appointment:{a}" for a in self._found.appointments}
        doomed: list[bytes] = []
        named: set[str] = set()
        for key in self._redis.scan_iter(match=f"{ORDER}*", count=_PAGE):
            name = key.decode().lower().removesuffix(":lock")
            if any(name.endswith(entity) for entity in entities):
                doomed.append(key)
                if not key.endswith(b":lock"):
                    event_id = _text(self._redis.hget(key, "event_id"))
                    if event_id:
                        named.add(event_id)
        if doomed:
            self._redis.delete(*doomed)
        self._found.removed["ordering"] += sum(1 for k in doomed if not k.endswith(b":lock"))
        return named

    def _dedup(self, wanted: set[str]) -> None:
        keys = self._redis.scan_iter(match=f"{DEDUP}*", count=_PAGE)
        for batch in _batches(keys):
            values = self._redis.mget(batch)
            # A calhook 0.1 message's key (dedup:legacy:<event id>) stays: it holds only the id,
            # and it keeps a copy of that message still queued from storing the event again.
            doomed = [
                k
                for k, v in zip(batch, values, strict=True)
                if _text(v) in wanted and not k.startswith(f"{DEDUP}legacy:".encode())
            ]
            if doomed:
                self._found.removed["dedup"] += int(self._redis.delete(*doomed))

    def _notify_marks(self, wanted: set[str]) -> None:
        # calhook:notify:<sent|posted>:<event_id>:<handler>
        keys = self._redis.scan_iter(match=f"{NOTIFY}*", count=_PAGE)
        doomed = [k for k in keys if _event_of_mark(k) in wanted]
        if doomed:
            self._found.removed["notify_marks"] += int(self._redis.delete(*doomed))

    def _recent_failures(self, wanted: set[str]) -> None:
        entries: list[bytes] = self._redis.lrange(RECENT_FAILURES, 0, -1)  # type: ignore[assignment]
        for entry in entries:
            try:
                event_id = orjson.loads(entry).get("event_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if event_id in wanted:
                removed = int(self._redis.lrem(RECENT_FAILURES, 0, entry))  # type: ignore[arg-type]
                self._found.removed["recent_failures"] += removed


def forget_customer(pairs: PairStore, customer: str) -> ForgetReport:
    """Erase the customer ``customer`` (a uuid) from every store in Redis; what was removed."""
    return Forgetter(pairs, customer).run()


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
