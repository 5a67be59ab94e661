"""Order per entity: a late, older event never overwrites newer state (DESIGN.md rule 6).

Calenso does not promise order, and retries reorder further. For a handler registered with
``ordered=True``, each event of an entity (a customer; one appointment) carries a version, and
the handler runs only if its version is newer than the last one it applied to that entity:

- Versions compare by ``created`` (to the second, as Calenso sends it), then by kind
  (created < updated < deleted/cancelled), then by event_id (UUIDv7, so arrival order).
  The kind decides ties because Calenso stamps a create and the update right after it, or an
  update and the delete right after it, with the same second; the reverse order is implausible.
- Once an entity is deleted (a customer) or cancelled (an appointment), only a newer *create*
  applies again; a newer update does not resurrect it.

Stale events are recorded as ``skipped_stale``, not failed. Runs for one entity are serialised by
a short Redis lock, so two workers cannot apply two versions at once.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from calhook.constants import KEY_PREFIX
from schemas import AppointmentEvent, CalensoEvent, CustomerEvent
from workers.errors import RetryLater

CREATE, UPDATE, DELETE = 0, 1, 2

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Version:
    """Where one event stands in its entity's history."""

    entity: str
    created_s: int
    kind: int
    event_id: str

    @property
    def order(self) -> tuple[int, int, str]:
        """What versions compare by."""
        return (self.created_s, self.kind, self.event_id)


def _kind(event_type: str) -> int:
    if event_type.endswith((".deleted", ".cancelled")):
        return DELETE
    if event_type.endswith(".created"):
        return CREATE
    return UPDATE


def version_of(event: CalensoEvent, event_id: str) -> Version | None:
    """The version of a customer or appointment event; None for events without an entity."""
    if isinstance(event, CustomerEvent):
        entity = f"customer:{event.customer.uuid}"
    elif isinstance(event, AppointmentEvent):
        entity = f"appointment:{event.appointment.uuid}"
    else:
        return None
    return Version(entity, int(event.created.timestamp()), _kind(event.type), event_id)


def booking_customer_version(event: CalensoEvent, event_id: str) -> Version | None:
    """The version of the customer a booking carries: an update of that customer, never a create.

    So a booking's customer snapshot cannot undo a newer ``customer.updated``, nor bring back a
    deleted customer.
    """
    if event.customer is None or not event.customer.uuid:
        return None
    return Version(
        f"customer:{event.customer.uuid}", int(event.created.timestamp()), UPDATE, event_id
    )


class OrderGuard:
    """Applied versions per (handler, entity), and the lock that serialises their runs."""

    def __init__(self, client: redis.Redis, ttl_s: int, lock_s: int, wait_s: float = 5.0) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._lock_ms = lock_s * 1000
        self._wait_s = wait_s
        self._release = client.register_script(_RELEASE_LUA)

    @contextlib.contextmanager
    def hold(self, handler: str, version: Version | None) -> Iterator[bool]:
        """Yield whether ``version`` is fresh; when the block ends cleanly, it becomes current."""
        if version is None:
            yield True
            return
        base = f"{KEY_PREFIX}order:{handler}:{version.entity}"
        token = self._lock(f"{base}:lock")
        try:
            fresh = self._is_fresh(base, version)
            yield fresh
            if fresh:
                self._commit(base, version)
        finally:
            self._release(keys=[f"{base}:lock"], args=[token])

    def _lock(self, key: str) -> str:
        token = secrets.token_hex(8)
        deadline = time.monotonic() + self._wait_s
        while not self._redis.set(key, token, nx=True, px=self._lock_ms):
            if time.monotonic() > deadline:
                raise RetryLater("another event of this entity is being handled", after_s=1.0)
            time.sleep(0.02)
        return token

    def _is_fresh(self, base: str, version: Version) -> bool:
        stored: dict[bytes, bytes] = self._redis.hgetall(base)  # type: ignore[assignment]
        if not stored:
            return True
        current = (int(stored[b"created_s"]), int(stored[b"kind"]), stored[b"event_id"].decode())
        if version.order <= current:
            return False
        # Deleted or cancelled stays so, unless the entity is created anew.
        return not (current[1] == DELETE and version.kind != CREATE)

    def _commit(self, base: str, version: Version) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                base,
                mapping={
                    "created_s": version.created_s,
                    "kind": version.kind,
                    "event_id": version.event_id,
                },
            )
            pipe.expire(base, self._ttl_s)
            pipe.execute()
