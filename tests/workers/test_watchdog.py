"""The watchdog: a message lost between Redis and a worker comes back; finished work is not
watched any more."""

from __future__ import annotations

import time

import redis

from calhook.constants import WATCHDOG_KEY, pair_id
from calhook.messages import Delivery, read_task_message
from tests.conftest import FIXTURES
from tests.support.recording import EFFECTS_KEY, RECORD_QUEUE
from tests.support.waiting import wait_for
from tests.support.worker import WorkerProcess
from workers.dispatch import handler_message
from workers.watchdog import Watchdog, cancel


def test_a_due_entry_is_queued_again_and_rearmed(redis_db: redis.Redis) -> None:
    watchdog = Watchdog(redis_db, watchdog_s=60)
    now = time.time()
    watchdog.arm("e1.h", "somequeue", b"message-1", not_before_s=now)
    watchdog.arm("e2.h", "somequeue", b"message-2", not_before_s=now)
    cancel(redis_db, "e2.h")

    assert watchdog.fire_due(now + 59) == []
    assert watchdog.fire_due(now + 61) == ["e1.h"]

    assert redis_db.lrange("somequeue", 0, -1) == [b"message-1"]
    assert watchdog.depth() == 1
    assert watchdog.fire_due(now + 62) == []  # re-armed for another minute


def test_a_lost_handler_message_is_run_by_the_watchdog(
    worker: WorkerProcess, redis_db: redis.Redis
) -> None:
    # As if a worker had taken the message off its queue and lost it before recording it as
    # unacked: the message is nowhere but in its watchdog entry, which is due.
    body = (FIXTURES / "lead.created.nested.json").read_text()
    message = handler_message("record", RECORD_QUEUE, Delivery("e-lost", body, "default", 1.0),
                              "lead.created", 1)  # fmt: skip
    Watchdog(redis_db, watchdog_s=1).arm(pair_id("e-lost", "record"), RECORD_QUEUE, message, 0)

    wait_for(lambda: redis_db.hget(EFFECTS_KEY, "e-lost:record") == b"1", what="the lost run")

    wait_for(lambda: redis_db.zcard(WATCHDOG_KEY) == 0, what="the entry to be cancelled")
    assert read_task_message(message)[2]["handler"] == "record"
