"""The bookings handler, tested with calhook.testing against a real PostgreSQL: the events as
Calenso sends them (both shapes), delivered with calhook's semantics (retries, order per
appointment, dead letters)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import calhook_bookings
import psycopg
import pytest

from calhook.testing import Harness, Sample

APPOINTMENT = "0f6b2d4e-8a1c-4e3f-b5d7-2c9a6e8f1b35"
Make = Callable[..., Sample]


@pytest.fixture
def dsn(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A schema of its own in the test database, as BOOKINGS_DSN."""
    base = os.environ.get("BOOKINGS_TEST_DSN", "postgresql://root@127.0.0.1/test")
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {base}: {exc}")
    schema = f"bookings_{secrets.token_hex(4)}"
    admin.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    monkeypatch.setenv(calhook_bookings.DSN_ENV, dsn)
    yield dsn
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def rows(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute("SELECT * FROM bookings ORDER BY appointment_uuid")
        names = [c.name for c in cursor.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


@pytest.mark.parametrize("shape", ["nested", "flat"])
def test_a_booking_becomes_a_row(
    dsn: str, calenso_event: Make, calhook_harness: Harness, shape: str
) -> None:
    booked = calenso_event("appointment.booking.created", shape=shape)

    result = calhook_harness.run(calhook_bookings.keep_table, booked)

    assert result.outcome(booked) == "done"
    (row,) = rows(dsn)
    assert row["appointment_uuid"] == APPOINTMENT
    assert row["status"] == "booked"
    assert row["starts_at"].isoformat() == "2025-03-20T13:00:00+00:00"
    assert row["customer_uuid"] == "c3a9e5d2-41b7-4f0e-8c2d-6e1f0a9b7d34"
    assert row["last_event_id"] == result.of(booked).event_id


def test_a_cancellation_that_arrives_before_its_booking_stays_cancelled(
    dsn: str, calenso_event: Make, calhook_harness: Harness
) -> None:
    booked = calenso_event("appointment.booking.created", created="2025-03-18 10:00:00")
    moved = calenso_event("appointment.updated", created="2025-03-18 12:00:00",
                          appointment={"start_utc": "2025-03-21 09:00:00"})  # fmt: skip
    cancelled = calenso_event("appointment.booking.cancelled", created="2025-03-18 16:41:09")

    # Delivered the wrong way round: the cancellation first, the booking last.
    result = calhook_harness.run(calhook_bookings.keep_table, cancelled, moved, booked)

    assert {result.outcome(s) for s in (booked, moved, cancelled)} <= {"done", "stale"}
    (row,) = rows(dsn)
    assert row["status"] == "cancelled"
    assert row["last_event_type"] == "appointment.booking.cancelled"


def test_the_same_event_twice_leaves_one_row(
    dsn: str, calenso_event: Make, calhook_harness: Harness
) -> None:
    booked = calenso_event("appointment.booking.created")
    calhook_harness.run(calhook_bookings.keep_table, booked)
    first = rows(dsn)

    # As after a crash between the upsert and calhook recording it done.
    calhook_harness.run(calhook_bookings.keep_table, booked)

    assert len(rows(dsn)) == 1
    assert {k: v for k, v in rows(dsn)[0].items() if k not in ("updated_at", "last_event_id")} == {
        k: v for k, v in first[0].items() if k not in ("updated_at", "last_event_id")
    }


def test_a_database_that_is_down_is_retried_then_dead_lettered(
    calenso_event: Make, calhook_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(calhook_bookings.DSN_ENV, "postgresql://root@127.0.0.1:1/test")
    booked = calenso_event("appointment.booking.created")

    result = calhook_harness.run(calhook_bookings.keep_table, booked)

    pair = result.of(booked)
    assert pair.state == "dead"
    assert pair.runs == 4  # the first attempt and the three retries of the test schedule
    assert set(pair.errors) == {"OperationalError"}
    assert result.dead_letters[0]["reason"] == "exhausted"


def test_an_appointment_without_a_uuid_never_reaches_the_handler(
    dsn: str, calenso_event: Make, calhook_harness: Harness
) -> None:
    nameless = calenso_event("appointment.booking.created", appointment={"uuid": None})

    result = calhook_harness.run(calhook_bookings.keep_table, nameless)

    # calhook parks it (an ordered handler's event needs its entity); nothing is written.
    assert result.outcome(nameless) == "parked"
    assert result.dead_letters == []
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('bookings')").fetchone() == (None,)
