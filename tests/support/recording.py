"""Handlers the tests load into the real worker. Each records what it did in Redis.

- ``record`` (every current type): counts raw runs, and applies its effect once per
  idempotency key, as a well-behaved outside system would; keeps the canonical view it saw.
- ``fake_crm`` (customer events, ``ordered``): a CRM in a Redis hash per customer.
- Custom types drive failures: ``test.always_fails``, ``test.flaky`` (fails ``data.fail_times``
  times), ``test.permanent`` (permanent until ``FIXED_KEY`` is set), ``test.slow`` (sleeps
  ``data.sleep_s``), ``test.poison`` (kills its own worker process).

What the handlers of this module record (runs, effects, views) goes to the broker Redis, unless
:data:`OUTSIDE_URL_ENV` names another server: there it lives as an outside system's records do,
untouched when the broker crashes or fails over and rolls back what it had not persisted or
replicated. A test of such a fault reads them there (each effect also with the time it applied).
Each run counted is also logged with the time it began (``RUN_LOG_KEY``).
"""

from __future__ import annotations

import functools
import os
import signal
import time

import redis

from schemas import CURRENT_TYPES, AppointmentEvent, CalensoEvent, CustomerEvent, UnknownEvent
from workers.connections import redis_client
from workers.errors import PermanentError, RetryLater
from workers.registry import HandlerContext, handler

RUNS_KEY = "calhook:test:runs"
# Every run of a pair counted in RUNS_KEY, as ``event_id:handler <wall-clock start>``.
RUN_LOG_KEY = "calhook:test:run_log"
EFFECTS_KEY = "calhook:test:effects"
VIEWS_KEY = "calhook:test:views"
FIXED_KEY = "calhook:test:fixed"
RECORD_QUEUE = "record"
FAILING_TYPE = "test.always_fails"
FLAKY_TYPE = "test.flaky"
PERMANENT_TYPE = "test.permanent"
SLOW_TYPE = "test.slow"
POISON_TYPE = "test.poison"
RETRY_LATER_TYPE = "test.retry_later"
APPOINTMENT_LOG_KEY = "calhook:test:appointment_log"
# The Redis of the outside system the handlers here record in; the broker's when unset.
OUTSIDE_URL_ENV = "CALHOOK_TEST_OUTSIDE_URL"
# On the outside Redis only: each effect's ``event_id:handler``, scored by when it applied.
EFFECT_AT_KEY = "calhook:test:effect_at"


def crm_key(customer_uuid: str) -> str:
    return f"calhook:test:crm:{customer_uuid}"


@functools.cache
def outside_url() -> str | None:
    """The outside Redis's URL (a test's setting, read once a process), None for the broker."""
    return os.environ.get(OUTSIDE_URL_ENV) or None


@functools.cache
def _outside() -> redis.Redis:
    url = outside_url()
    assert url is not None
    # redis-py resets a pool after a fork, so the prefork children may share this function.
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)


def recorder() -> redis.Redis:
    """Where the handlers of this module record what they did: see the module docstring."""
    return _outside() if outside_url() else redis_client()


def count_run(ctx: HandlerContext) -> int:
    """Count one run of the pair, and log when it began (``RUN_LOG_KEY``), in one step."""
    pair = f"{ctx.event_id}:{ctx.handler}"
    with recorder().pipeline(transaction=True) as pipe:
        pipe.hincrby(RUNS_KEY, pair, 1)
        pipe.rpush(RUN_LOG_KEY, f"{pair} {time.time():.3f}")
        runs, _ = pipe.execute()
    return int(runs)


# Atomic, as an outside system's idempotent write is: a connection lost between marking the key
# seen and counting the effect would otherwise leave the effect uncounted for ever.
_EFFECT_LUA = """
if redis.call('SET', KEYS[1], 1, 'NX') then redis.call('HINCRBY', KEYS[2], ARGV[1], 1) end
"""


_EFFECT_AT_LUA = """
if redis.call('SET', KEYS[1], 1, 'NX') then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
"""


def apply_effect(ctx: HandlerContext) -> None:
    """The side effect, made idempotent by the key calhook hands to outside systems."""
    keys = [f"calhook:test:seen:{ctx.idempotency_key}", EFFECTS_KEY]
    pair = f"{ctx.event_id}:{ctx.handler}"
    if outside_url():
        _outside().eval(_EFFECT_AT_LUA, 3, *keys, EFFECT_AT_KEY, pair, time.time())
    else:
        redis_client().eval(_EFFECT_LUA, 2, *keys, pair)


@handler(*sorted(CURRENT_TYPES), queue=RECORD_QUEUE, name="record")
def record(event: CalensoEvent, ctx: HandlerContext) -> None:
    count_run(ctx)
    recorder().hset(VIEWS_KEY, ctx.event_id, event.model_dump_json())
    apply_effect(ctx)


@handler("customer.created", "customer.updated", "customer.deleted", queue=RECORD_QUEUE,
         name="fake_crm", ordered=True)  # fmt: skip
def fake_crm(event: CustomerEvent, ctx: HandlerContext) -> None:
    count_run(ctx)
    key = crm_key(event.customer.uuid or "")
    if event.type == "customer.deleted":
        redis_client().hset(key, mapping={"deleted": 1, "event_id": ctx.event_id})
    else:
        redis_client().hset(
            key,
            mapping={
                "deleted": 0,
                "last_name": event.customer.last_name or "",
                "event_id": ctx.event_id,
            },
        )


@handler(FAILING_TYPE, queue=RECORD_QUEUE, name="explode")
def explode(event: CalensoEvent, ctx: HandlerContext) -> None:
    count_run(ctx)
    raise RuntimeError("this handler always fails")


@handler(FLAKY_TYPE, queue=RECORD_QUEUE, name="flaky")
def flaky(event: UnknownEvent, ctx: HandlerContext) -> None:
    runs = count_run(ctx)
    if runs <= int(event.raw_data.get("fail_times", 0)):
        raise RuntimeError(f"failure {runs}")
    apply_effect(ctx)


@handler(PERMANENT_TYPE, queue=RECORD_QUEUE, name="permanent")
def permanent(event: CalensoEvent, ctx: HandlerContext) -> None:
    count_run(ctx)
    if not redis_client().exists(FIXED_KEY):
        raise PermanentError("the other side refused this for good (400)")
    apply_effect(ctx)


@handler(SLOW_TYPE, queue=RECORD_QUEUE, name="slow")
def slow(event: UnknownEvent, ctx: HandlerContext) -> None:
    count_run(ctx)
    time.sleep(float(event.raw_data.get("sleep_s", 0.2)))
    apply_effect(ctx)


@handler(POISON_TYPE, queue=RECORD_QUEUE, name="poison")
def poison(event: CalensoEvent, ctx: HandlerContext) -> None:
    count_run(ctx)
    os.kill(os.getpid(), signal.SIGKILL)


@handler(RETRY_LATER_TYPE, queue=RECORD_QUEUE, name="retry_later")
def retry_later(event: UnknownEvent, ctx: HandlerContext) -> None:
    """Like a CRM answering 429 with ``Retry-After``, once."""
    if count_run(ctx) == 1:
        raise RetryLater("429 Too Many Requests", after_s=float(event.raw_data["after_s"]))
    apply_effect(ctx)


@handler("appointment.booking.created", "appointment.updated", "appointment.booking.cancelled",
         queue=RECORD_QUEUE, name="appointment_log", ordered=True)  # fmt: skip
def appointment_log(event: AppointmentEvent, ctx: HandlerContext) -> None:
    """Append each applied appointment event's type, in the order applied."""
    redis_client().rpush(APPOINTMENT_LOG_KEY, event.type)
