"""calhook.testing, as a team uses it: sample events in both shapes with overrides, and the
harness running handlers with calhook's semantics (the plugin's fixtures, against the suite's
Redis through CALHOOK_TEST_REDIS_URL or an embedded one)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from calhook.testing import Harness, HarnessError, Sample, SampleError, sample_types
from schemas import KNOWN_TYPES, AppointmentEvent, CalensoEvent, CustomerEvent, UnknownEvent
from schemas.catalogue import family_of
from schemas.events import MODEL_BY_FAMILY
from tests.conftest import FIXTURES, ROOT
from workers.errors import PermanentError, RetryLater
from workers.registry import HandlerContext, RetryPolicy, handler

CALLS: Counter[str] = Counter()
SEEN: list[tuple[str, str]] = []


@handler("customer.created", queue="testing", name="testing.flaky")
def flaky(event: CustomerEvent, ctx: HandlerContext) -> None:
    CALLS[ctx.event_id] += 1
    if CALLS[ctx.event_id] < 3:
        raise ConnectionError("the CRM hung up")


@handler("customer.created", queue="testing", name="testing.refuses")
def refuses(event: CustomerEvent, ctx: HandlerContext) -> None:
    raise PermanentError("the CRM says 422: no such salutation")


@handler("appointment.booking.created", "appointment.updated", queue="testing",
         name="testing.bookings", ordered=True)  # fmt: skip
async def bookings(event: AppointmentEvent, ctx: HandlerContext) -> None:
    await asyncio.sleep(0)
    SEEN.append((ctx.event_id, event.type))


def test_every_sample_parses_in_every_shape_to_its_family(
    calenso_event: Callable[..., Sample],
) -> None:
    # One sample per type and shape of the shared fixtures, planned types included.
    shipped = {p.name for p in FIXTURES.glob("*.json")} | {
        p.name for p in (FIXTURES / "planned").glob("*.json")
    }
    derived = {f"{t}.{s}.json" for t in ("event.booking.payment_failed",
               "event.manual.booking.created") for s in ("nested", "flat")}  # fmt: skip
    assert {f"{t}.{s}.json" for t, shapes in sample_types().items() for s in shapes} == (
        shipped - {"request.example.json"} | derived
    )
    # Every type Calenso's catalogue knows has a sample.
    assert set(KNOWN_TYPES) <= set(sample_types())
    for event_type, shapes in sample_types().items():
        family = family_of(event_type)
        model = MODEL_BY_FAMILY[family] if family is not None else UnknownEvent
        for shape in shapes:
            event = calenso_event(event_type, shape=shape).event
            assert isinstance(event, model), (event_type, shape)
            assert event.type == event_type


def test_overrides_reach_the_event_in_both_shapes(calenso_event: Callable[..., Sample]) -> None:
    for shape in ("nested", "flat"):
        sample = calenso_event("appointment.booking.cancelled", shape=shape,
                               customer={"email": "anna.muster@example.org"})  # fmt: skip
        event = sample.event
        assert isinstance(event, AppointmentEvent)
        assert event.customer is not None
        assert event.customer.email == "anna.muster@example.org", shape
        assert b"anna.muster@example.org" in sample.body
    created = calenso_event("customer.created", created="2026-01-02 03:04:05",
                            customer={"lastname": "Muster"}).event  # fmt: skip
    assert created.customer is not None
    assert created.customer.last_name == "Muster"
    # Each call is a fresh copy: an override never leaks into the next sample.
    assert calenso_event("customer.created").event.customer.last_name != "Muster"  # type: ignore[union-attr]


def test_a_type_or_shape_without_a_sample_is_refused_with_what_there_is(
    calenso_event: Callable[..., Sample],
) -> None:
    with pytest.raises(SampleError) as raised:
        calenso_event("invoice.paid")
    assert str(raised.value).startswith("no sample of 'invoice.paid'; there are: appointment.")
    with pytest.raises(SampleError) as raised:
        calenso_event("lead.created", shape="flat")
    assert str(raised.value) == "no flat sample of 'lead.created'; it comes as: nested"


def test_retries_run_on_a_fast_schedule_until_done(
    calhook_harness: Harness, calenso_event: Callable[..., Sample]
) -> None:
    first, second = calenso_event("customer.created"), calenso_event("customer.created", "flat")
    result = calhook_harness.run(flaky, first, second)
    for sample in (first, second):
        pair = result.of(sample)
        assert (pair.state, pair.attempts, pair.runs) == ("done", 3, 3)
        assert pair.outcomes == ("retry_scheduled", "retry_scheduled", "ok")
        assert pair.errors == ("ConnectionError", "ConnectionError")
    assert result.dead_letters == []


def test_a_database_holding_what_the_harness_did_not_write_is_refused_not_emptied(
    calhook_redis_url: str, calenso_event: Callable[..., Sample]
) -> None:
    # The harness's database (no worker of the suite reads it), holding someone else's key.
    redis_db = redis.Redis.from_url(calhook_redis_url)
    redis_db.flushdb()
    redis_db.set("someone:else", "theirs")
    harness = Harness(calhook_redis_url)
    try:
        with pytest.raises(HarnessError, match="holds keys calhook\\.testing did not write"):
            harness.run(refuses, calenso_event("customer.created"))
        assert redis_db.get("someone:else") == b"theirs"
        redis_db.delete("someone:else")
        # Empty, then its own: each run empties it.
        for _ in range(2):
            result = harness.run(refuses, calenso_event("customer.created"))
            assert result.outcome(0) == "dead"
    finally:
        harness.close()
        redis_db.close()


def test_a_permanent_error_is_a_dead_letter_at_once(
    calhook_harness: Harness, calenso_event: Callable[..., Sample]
) -> None:
    sample = calenso_event("customer.created")
    result = calhook_harness.run("testing.refuses", sample)
    assert (result.outcome(sample), result.attempts(sample)) == ("dead", 1)
    (letter,) = result.dead_letters
    assert letter["reason"] == "permanent"
    assert letter["error"] == "PermanentError: the CRM says 422: no such salutation"


def test_an_ordered_async_handler_sees_an_entity_in_version_order(
    calhook_harness: Harness, calenso_event: Callable[..., Sample]
) -> None:
    SEEN.clear()
    appointment = {"uuid": "6c1d0c55-5c3a-4c1e-9f52-7a3b0f0e5a11"}
    older = calenso_event("appointment.booking.created", created="2026-03-01 10:00:00",
                          appointment=appointment)  # fmt: skip
    newer = calenso_event("appointment.updated", created="2026-03-01 11:00:00",
                          appointment=appointment)  # fmt: skip
    # Delivered newest first (a retry, a slow network): applied oldest first all the same.
    result = calhook_harness.run(bookings, newer, older)
    assert (result.outcome(newer), result.outcome(older)) == ("done", "done")
    assert [t for _, t in SEEN] == ["appointment.booking.created", "appointment.updated"]


def test_an_event_its_handler_does_not_take_is_parked(
    calhook_harness: Harness, calenso_event: Callable[..., Sample]
) -> None:
    sample = calenso_event("lead.created")
    assert calhook_harness.run(flaky, sample).outcome(sample) == "parked"


TEAM_TEST = """
from schemas import CustomerEvent
from workers.registry import HandlerContext, handler

DONE = []

@handler("customer.created", queue="team", name="team.welcome")
def welcome(event: CustomerEvent, ctx: HandlerContext) -> None:
    DONE.append(event.customer.email)

def test_welcome(calenso_event, calhook_harness):
    sample = calenso_event("customer.created", shape="flat", customer={"email": "a@example.org"})
    assert calhook_harness.run(welcome, sample).outcome(sample) == "done"
    assert DONE == ["a@example.org"]
"""


def test_a_teams_pytest_gets_the_fixtures_from_the_installed_plugin(
    tmp_path: Path, calhook_redis_url: str
) -> None:
    (tmp_path / "test_team.py").write_text(TEAM_TEST)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CALHOOK_TEST_REDIS_URL": calhook_redis_url},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


def test_an_override_by_a_name_the_payload_does_not_have_is_refused(
    calenso_event: Callable[..., Sample],
) -> None:
    for shape in ("nested", "flat"):
        with pytest.raises(SampleError) as raised:
            calenso_event("customer.created", shape=shape, customer={"first_name": "Erika"})
        assert str(raised.value).startswith(
            "customer has no field 'first_name' in Calenso's payload (it has: "
        ), shape
        assert "prename" in str(raised.value)
    with pytest.raises(SampleError, match="has no 'payment'"):
        calenso_event("customer.created", payment={"amount": 1})
    # What the sample lacks goes in through data=.
    extra = calenso_event("customer.created", data={"customer": {"vip": True}})
    assert extra.payload["data"]["customer"]["vip"] is True


def test_the_same_body_twice_is_one_event_as_at_the_ingress(
    calhook_harness: Harness, calenso_event: Callable[..., Sample]
) -> None:
    CALLS.clear()
    sample = calenso_event("customer.created", customer={"lastname": "Twice"})
    result = calhook_harness.run("testing.flaky", sample, sample)
    assert result.of(0).event_id == result.of(1).event_id
    assert result.of(0).runs == 3  # one event: its three calls, not six
    assert sum(CALLS.values()) == 3


SLOW: Counter[str] = Counter()


@handler("lead.created", queue="testing", name="testing.slow_schedule",
         retry=RetryPolicy(quick_retries=0, schedule_s=(300.0, 3600.0)))  # fmt: skip
def slow_schedule(event: CalensoEvent, ctx: HandlerContext) -> None:
    SLOW[ctx.event_id] += 1
    if SLOW[ctx.event_id] == 1:
        raise RetryLater("the CRM asks for 30 s", after_s=30)
    if SLOW[ctx.event_id] == 2:
        raise ConnectionError("down")


def test_a_handlers_own_schedule_and_retry_after_are_brought_forward(
    calhook_harness: Harness, calenso_event: Callable[..., Sample]
) -> None:
    sample = calenso_event("lead.created")
    started = time.monotonic()
    result = calhook_harness.run(slow_schedule, sample, timeout_s=10)
    assert time.monotonic() - started < 10
    assert (result.outcome(sample), result.of(sample).runs) == ("done", 3)


def test_the_package_names_resolve_on_first_use() -> None:
    import calhook.testing as kit

    for name in kit.__all__:
        assert getattr(kit, name) is not None
    with pytest.raises(AttributeError):
        kit.nothing_here  # noqa: B018
