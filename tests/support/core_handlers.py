"""Handlers for the recovery tests (tests/workers/test_recovery.py): an ordered handler that
can be held mid-run, so a test can kill its worker there.

``hold.apply`` handles ``test.hold`` events, ordered per ``data.entity``; it records each run
(``RUNS_KEY``) and each applied version in order (``APPLIED_KEY``); its first run of an event
sleeps ``data.sleep_s`` before applying.
"""

from __future__ import annotations

import time

from schemas import CalensoEvent, UnknownEvent
from workers.connections import redis_client
from workers.errors import Defer
from workers.ordering import UPDATE, Version
from workers.registry import HandlerContext, handler

HOLD_TYPE = "test.hold"
RUNS_KEY = "calhook:test:hold:runs"
APPLIED_KEY = "calhook:test:hold:applied"
STARTED_KEY = "calhook:test:hold:started"


def _version(event: CalensoEvent, event_id: str) -> Version | None:
    assert isinstance(event, UnknownEvent)
    entity = str(event.raw_data.get("entity", ""))
    return Version(f"thing:{entity}", int(event.created.timestamp()), UPDATE, event_id)


@handler(HOLD_TYPE, queue="hold", name="hold.apply", order_key=_version)
def apply(event: UnknownEvent, ctx: HandlerContext) -> None:
    client = redis_client()
    runs = client.hincrby(RUNS_KEY, ctx.event_id, 1)
    client.rpush(STARTED_KEY, ctx.event_id)
    if runs == 1:
        time.sleep(float(event.raw_data.get("sleep_s", 0)))
    client.rpush(APPLIED_KEY, ctx.event_id)


DEFER_TYPE = "test.defer"
DEFER_RUNS_KEY = "calhook:test:defer:runs"


@handler(DEFER_TYPE, queue="hold", name="defer.twice")
def defer_twice(event: UnknownEvent, ctx: HandlerContext) -> None:
    """Finds its destination's rate limit used up twice, then gets through."""
    if redis_client().hincrby(DEFER_RUNS_KEY, ctx.event_id, 1) <= 2:
        raise Defer("the rate limit is used up", after_s=0.2)
