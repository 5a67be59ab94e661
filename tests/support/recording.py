"""Handlers the tests load into the real worker: they record each run in Redis.

``record`` runs for every current type; ``explode`` always fails, for a custom type, so the
dead-letter path and custom-type routing are exercised.
"""

from __future__ import annotations

from schemas import CURRENT_TYPES, CalensoEvent
from workers.connections import redis_client
from workers.registry import HandlerContext, handler

RUNS_KEY = "calhook:test:runs"
VIEWS_KEY = "calhook:test:views"
RECORD_QUEUE = "record"
FAILING_TYPE = "test.always_fails"


@handler(*sorted(CURRENT_TYPES), queue=RECORD_QUEUE, name="record")
def record(event: CalensoEvent, ctx: HandlerContext) -> None:
    """Count the run and keep the canonical view the handler saw."""
    client = redis_client()
    with client.pipeline(transaction=True) as pipe:
        pipe.hincrby(RUNS_KEY, f"{ctx.event_id}:{ctx.handler}", 1)
        pipe.hset(VIEWS_KEY, ctx.event_id, event.model_dump_json())
        pipe.execute()


@handler(FAILING_TYPE, queue=RECORD_QUEUE, name="explode")
def explode(event: CalensoEvent, ctx: HandlerContext) -> None:
    """Fail, every time."""
    redis_client().hincrby(RUNS_KEY, f"{ctx.event_id}:{ctx.handler}", 1)
    raise RuntimeError("this handler always fails")
