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

Dispatch computes each ordered pair's version and stores it with the pair; starting the pair
(``calhook/store/lua/start.lua``) compares it with the entity's applied version and takes the
entity's lock in the same step. Stale events end as ``skipped_stale``, not failed. The lock is
renewed by the heartbeat with the pair's lease; when a worker dies, the scheduler keeps it for
that pair until the pair runs again (its effect may have happened). A pair that finds it held
waits (``CALHOOK_ORDER_WAIT_S``) without spending an attempt. Done commits the version; any
other ending only releases the lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import AppointmentEvent, CalensoEvent, CustomerEvent

CREATE, UPDATE, DELETE = 0, 1, 2


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

    def encode(self) -> str:
        """As the pair stores it, for the Lua comparison: ``<created s>|<kind>|<event id>``."""
        return f"{self.created_s}|{self.kind}|{self.event_id}"


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
