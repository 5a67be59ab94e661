"""Handlers for the fault-injection tests and the soak, loaded beside ``tests.support.recording``.

- ``ordered_apply`` (``test.ordered``, ``ordered``): applies versions of an entity the event
  names (``data.entity``, ``data.v``), sleeping ``data.sleep_s`` first when told to. While it
  runs, :data:`RUNNING_KEY` holds the pid of the process running it (so a test can kill that
  worker mid-run); each applied version is appended to the entity's :func:`applied_key`.
- ``transient`` (``test.transient``): raises :class:`~workers.errors.TransientError` on its
  first ``data.fail_times`` calls (the in-call quick retries count), then applies its effect.
- ``crash`` (``test.crash``): kills its own worker process when ``data.crash`` is true (every
  time: a poison event), else applies its effect; so one handler's batch can mix the two.

Both count their runs and apply their effect as :mod:`tests.support.recording` does.
"""

from __future__ import annotations

import os
import signal
import time

import redis

from schemas import UnknownEvent
from tests.support.recording import RECORD_QUEUE, apply_effect, count_run
from workers.connections import redis_client
from workers.errors import TransientError
from workers.ordering import UPDATE, Version
from workers.registry import HandlerContext, handler

ORDERED_TYPE = "test.ordered"
TRANSIENT_TYPE = "test.transient"
CRASH_TYPE = "test.crash"
ORDERED_QUEUE = "ordered"
ORDERED_HANDLER = "ordered_apply"
RUNNING_KEY = "calhook:test:chaos:running"
APPLIED_PREFIX = "calhook:test:chaos:applied:"


def applied_key(entity: str) -> str:
    """The versions ``ordered_apply`` applied to ``entity``, in the order it applied them."""
    return f"{APPLIED_PREFIX}{entity}"


def applied_versions(client: redis.Redis, entity: str) -> list[int]:
    """The versions ``ordered_apply`` applied to ``entity``, in the order it applied them."""
    raw: list[bytes] = client.lrange(applied_key(entity), 0, -1)  # type: ignore[assignment]
    return [int(entry.split(b"|")[0]) for entry in raw]


def running_pid(client: redis.Redis, event_id: str) -> int | None:
    """The pid of the process running ``ordered_apply`` for ``event_id`` right now, if any."""
    pid = client.hget(RUNNING_KEY, event_id)
    return int(pid) if isinstance(pid, bytes) else None


def entity_version(event: UnknownEvent, event_id: str) -> Version:
    """The version of a ``test.ordered`` event: ``data.v`` of entity ``data.entity``."""
    data = event.raw_data
    return Version(f"soak:{data['entity']}", int(data["v"]), UPDATE, event_id)


@handler(ORDERED_TYPE, queue=ORDERED_QUEUE, name=ORDERED_HANDLER, order_key=entity_version)
def ordered_apply(event: UnknownEvent, ctx: HandlerContext) -> None:
    client = redis_client()
    client.hset(RUNNING_KEY, ctx.event_id, os.getpid())
    count_run(ctx)
    sleep_s = float(event.raw_data.get("sleep_s", 0))
    if sleep_s:
        time.sleep(sleep_s)
    data = event.raw_data
    client.rpush(applied_key(str(data["entity"])), f"{int(data['v'])}|{ctx.event_id}")
    apply_effect(ctx)
    client.hdel(RUNNING_KEY, ctx.event_id)


@handler(TRANSIENT_TYPE, queue=RECORD_QUEUE, name="transient")
def transient(event: UnknownEvent, ctx: HandlerContext) -> None:
    if count_run(ctx) <= int(event.raw_data.get("fail_times", 0)):
        raise TransientError("connection reset by peer")
    apply_effect(ctx)


@handler(CRASH_TYPE, queue=RECORD_QUEUE, name="crash")
def crash(event: UnknownEvent, ctx: HandlerContext) -> None:
    count_run(ctx)
    if event.raw_data.get("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    apply_effect(ctx)
