"""A bare Celery app with calhook's settings and one task that overruns its hard time limit once.

Run as ``python -m tests.support.timeout_app`` it is a prefork worker (one child) on
``TIMEOUT_QUEUE``, its settings read from the environment like any calhook process
(``REDIS_URL``, ``CALHOOK_TASK_TIME_LIMIT_S``, ``CALHOOK_VISIBILITY_TIMEOUT_S`` …). The task
counts its runs in Redis: the first run sleeps through the soft limit and past the hard one, so
the pool kills its child; a later run finishes at once. A second run means the message went
back to the queue rather than being acked with the killed run (RELIABILITY.md items 1, 2, 16).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from calhook.settings import Settings, load_settings
from workers.app import celery_config

TIMEOUT_QUEUE = "calhook-test-timeout"
TIMEOUT_TASK = "calhook.test.overrun_once"
RUNS_KEY = "calhook:test:timeout:runs"
STARTS_KEY = "calhook:test:timeout:starts"
FINISHED_KEY = "calhook:test:timeout:finished"
# Far past any hard time limit the test sets: only the pool's kill ends the first run.
FIRST_RUN_SLEEP_S = 60.0


def make_app(settings: Settings) -> Celery:
    """A Celery app configured by ``celery_config(settings)``, on a queue of its own."""
    app = Celery("calhook-timeout-test", set_as_current=False)
    app.conf.update(celery_config(settings))
    # Its own queue, so a calhook worker of the same session never takes the message.
    app.conf.task_default_queue = TIMEOUT_QUEUE
    client = redis.Redis.from_url(settings.require_redis_url())

    @app.task(name=TIMEOUT_TASK, bind=True)
    def overrun_once(self: Task[Any, Any]) -> int:
        run = int(client.incr(RUNS_KEY))
        client.rpush(STARTS_KEY, f"{run} {os.getpid()} {time.time()}")
        if run == 1:
            deadline = time.monotonic() + FIRST_RUN_SLEEP_S
            while time.monotonic() < deadline:
                try:
                    time.sleep(0.1)
                except SoftTimeLimitExceeded:
                    # Keep going: this test is about the hard limit, the one that kills.
                    continue
        client.rpush(FINISHED_KEY, run)
        return run

    return app


def main() -> None:
    app = make_app(load_settings())
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={TIMEOUT_QUEUE}",
            f"--hostname=timeout-test-{os.getpid()}@%h",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *sys.argv[1:],
        ]
    )


if __name__ == "__main__":
    main()
