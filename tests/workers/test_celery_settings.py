"""Celery ignores settings it does not know (RELIABILITY.md item 16): check the names, then the
behaviour they are there for, on a real worker process and a real Redis.

``task_acks_on_timeout`` first exists in Celery 5.7.0; on 5.5 and 5.6 it was dropped without a
word and a late-ack task killed at its hard time limit was acked, so its event was lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery.app.defaults import NAMESPACES, flatten

from calhook.settings import Settings
from tests.support.leaks import register_log
from tests.support.timeout_app import (
    FINISHED_KEY,
    RUNS_KEY,
    STARTS_KEY,
    TIMEOUT_QUEUE,
    TIMEOUT_TASK,
    make_app,
)
from tests.support.waiting import wait_for
from workers.app import celery_config

ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 2
# Long against the test's own deadlines: a second run seen before it cannot be Redis handing an
# unacked message out again; it can only be the worker putting the message back.
VISIBILITY_TIMEOUT_S = 60


def known_settings() -> dict[str, object]:
    """Every setting name the installed Celery reads, with its Option."""
    return dict(flatten(NAMESPACES))


def test_every_setting_calhook_passes_is_one_celery_knows(
    make_settings: Callable[..., Settings],
) -> None:
    config = celery_config(make_settings())
    known = known_settings()

    unknown = sorted(set(config) - set(known))

    assert unknown == [], f"Celery would silently ignore {unknown}"


def test_no_setting_calhook_passes_is_deprecated(make_settings: Callable[..., Settings]) -> None:
    known = known_settings()

    deprecated = sorted(
        name
        for name in celery_config(make_settings())
        if getattr(known.get(name), "deprecate_by", None)
    )

    assert deprecated == [], f"deprecated in the installed Celery: {deprecated}"


def test_a_bare_app_with_calhooks_settings_does_not_ack_a_timed_out_task(
    make_settings: Callable[..., Settings],
) -> None:
    # The attribute the worker reads when the hard limit kills a task (celery/worker/request.py).
    app = make_app(make_settings())

    task = app.tasks[TIMEOUT_TASK]

    assert task.acks_late is True
    # Not in celery-types yet, and missing before Celery 5.7.
    assert getattr(task, "acks_on_timeout", None) is False


@pytest.fixture
def timeout_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        task_time_limit_s=TIME_LIMIT_S,
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        watchdog_s=VISIBILITY_TIMEOUT_S + 1,
    )


@dataclass
class TimeoutWorker:
    """The worker process of ``tests.support.timeout_app`` and its log."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def runs(self, client: redis.Redis) -> int:
        """How often the task has started; fails at once if the worker died."""
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
        return int(client.get(RUNS_KEY) or 0)


@pytest.fixture
def timeout_worker(
    timeout_settings: Settings, redis_db: redis.Redis, tmp_path: Path
) -> Iterator[TimeoutWorker]:
    """``python -m tests.support.timeout_app``: a prefork worker with one child, on its queue."""
    log_path = tmp_path / "timeout-worker.log"
    register_log(log_path)
    env = {
        **os.environ,
        "REDIS_URL": timeout_settings.require_redis_url(),
        "CALHOOK_TASK_TIME_LIMIT_S": str(TIME_LIMIT_S),
        "CALHOOK_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "CALHOOK_WATCHDOG_S": str(VISIBILITY_TIMEOUT_S + 1),
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.timeout_app"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield TimeoutWorker(process, log_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_a_task_killed_at_its_hard_time_limit_is_requeued_not_acked(
    timeout_settings: Settings,
    timeout_worker: TimeoutWorker,
    redis_db: redis.Redis,
) -> None:
    with make_app(timeout_settings) as sender:
        sender.send_task(TIMEOUT_TASK, queue=TIMEOUT_QUEUE)

    wait_for(lambda: timeout_worker.runs(redis_db) >= 1, timeout_s=60, what="the first run")
    first_started = time.monotonic()
    wait_for(
        lambda: timeout_worker.runs(redis_db) >= 2,
        # The hard limit, the pool's once-a-second timeout check and a new child, with room;
        # well short of the visibility timeout.
        timeout_s=TIME_LIMIT_S + 15,
        what="a second run of the task killed at its hard time limit (was it acked?)",
    )
    assert time.monotonic() - first_started < VISIBILITY_TIMEOUT_S
    wait_for(lambda: redis_db.llen(FINISHED_KEY) >= 1, timeout_s=10, what="the second run's end")

    raw_starts: list[bytes] = redis_db.lrange(STARTS_KEY, 0, -1)  # type: ignore[assignment]
    starts = [entry.decode().split() for entry in raw_starts]
    finished = [int(run) for run in redis_db.lrange(FINISHED_KEY, 0, -1)]
    (first_run, first_pid, first_at), (second_run, second_pid, second_at) = starts[:2]
    assert (first_run, second_run) == ("1", "2")
    # The first run never finished: the pool killed its child, and a new child ran the retry.
    assert finished == [2]
    assert first_pid != second_pid
    assert float(second_at) - float(first_at) >= TIME_LIMIT_S
    # Acked once it succeeded: nothing waiting, nothing held unacked.
    wait_for(lambda: int(redis_db.hlen("unacked")) == 0, timeout_s=10, what="the final ack")
    assert redis_db.llen(TIMEOUT_QUEUE) == 0
    assert len(starts) == 2
