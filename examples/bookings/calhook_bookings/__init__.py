"""A bookings table in PostgreSQL, kept current from Calenso's appointment events.

A BI team's reaction to bookings, written as any team would write one: one handler, registered
for the appointment events it needs, on a queue of its own, run only where its database is
configured (``BOOKINGS_DSN``). calhook gives it the rest:

- **Once per event.** A run repeated after a crash upserts the same row again: the write is
  idempotent, keyed by the appointment's uuid.
- **Order per appointment.** ``ordered=True``: a late, older event (a retry, a slow network)
  never overwrites a newer one, and a cancelled booking stays cancelled.
- **Retries.** A database that is down raises; calhook retries on its schedule and holds the
  handler if its breaker opens. An event without an appointment uuid never gets here (calhook
  parks it: an ordered handler's event needs its entity); were one to, it would be a
  PermanentError, a dead letter at once.
- **Configuration** is read when the handler runs, and ``enabled=`` reads ``BOOKINGS_DSN`` when
  the worker loads its handlers: give it to every worker, the dispatching ones included.
"""

from __future__ import annotations

import os
import threading

import psycopg

from calhook.settings import Settings
from schemas import AppointmentEvent
from workers.errors import PermanentError
from workers.registry import HandlerContext, handler

DSN_ENV = "BOOKINGS_DSN"
BOOKING_TYPES = (
    "appointment.booking.created",
    "appointment.manual.booking.created",
    "appointment.updated",
    "appointment.booking.cancelled",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS bookings (
    appointment_uuid text PRIMARY KEY,
    status           text NOT NULL,
    starts_at        timestamptz,
    ends_at          timestamptz,
    title            text,
    store_id         bigint,
    worker_id        bigint,
    customer_uuid    text,
    services         text[] NOT NULL DEFAULT '{}',
    last_event_id    text NOT NULL,
    last_event_type  text NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
)
"""

UPSERT = """
INSERT INTO bookings (appointment_uuid, status, starts_at, ends_at, title, store_id, worker_id,
                      customer_uuid, services, last_event_id, last_event_type)
VALUES (%(uuid)s, %(status)s, %(starts_at)s, %(ends_at)s, %(title)s, %(store_id)s,
        %(worker_id)s, %(customer_uuid)s, %(services)s, %(event_id)s, %(event_type)s)
ON CONFLICT (appointment_uuid) DO UPDATE SET
    status = EXCLUDED.status,
    starts_at = COALESCE(EXCLUDED.starts_at, bookings.starts_at),
    ends_at = COALESCE(EXCLUDED.ends_at, bookings.ends_at),
    title = COALESCE(EXCLUDED.title, bookings.title),
    store_id = COALESCE(EXCLUDED.store_id, bookings.store_id),
    worker_id = COALESCE(EXCLUDED.worker_id, bookings.worker_id),
    customer_uuid = COALESCE(EXCLUDED.customer_uuid, bookings.customer_uuid),
    services = EXCLUDED.services,
    last_event_id = EXCLUDED.last_event_id,
    last_event_type = EXCLUDED.last_event_type,
    updated_at = now()
"""


def configured(settings: Settings) -> bool:
    """The handler runs where its database is configured."""
    return bool(os.environ.get(DSN_ENV))


def dsn() -> str:
    """The database, read when the handler runs (never when the module is imported)."""
    return os.environ[DSN_ENV]


_created: set[str] = set()
_lock = threading.Lock()


def create_table(conn: psycopg.Connection[tuple[object, ...]], where: str) -> None:
    """Create the table once per process and database, if it is not there (a migration tool
    would own this in production)."""
    with _lock:
        if where not in _created:
            conn.execute(SCHEMA)
            _created.add(where)


def row(event: AppointmentEvent, event_id: str) -> dict[str, object]:
    """The table's row as ``event`` leaves it."""
    appointment = event.appointment
    if not appointment.uuid:
        raise PermanentError(f"{event.type} without an appointment uuid")
    cancelled = event.type == "appointment.booking.cancelled"
    return {
        "uuid": appointment.uuid,
        "status": "cancelled" if cancelled else "booked",
        "starts_at": appointment.start_utc,
        "ends_at": appointment.end_utc,
        "title": appointment.title,
        "store_id": appointment.store_id or (event.store.id if event.store else None),
        "worker_id": appointment.worker_id or (event.worker.id if event.worker else None),
        "customer_uuid": event.customer.uuid if event.customer else None,
        "services": [s.name for s in event.services if s.name],
        "event_id": event_id,
        "event_type": event.type,
    }


@handler(*BOOKING_TYPES, queue="bookings", name="bookings.table", ordered=True,
         enabled=configured)  # fmt: skip
def keep_table(event: AppointmentEvent, ctx: HandlerContext) -> None:
    """Upsert the booking's row: once per event, in order per appointment."""
    where = dsn()
    with psycopg.connect(where, connect_timeout=5) as conn:
        create_table(conn, where)
        conn.execute(UPSERT, row(event, ctx.event_id))
