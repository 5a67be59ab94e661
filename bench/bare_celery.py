"""The baseline of the end-to-end benchmark: a bare Celery no-op task on the same Redis, with
calhook's broker settings (late acks, prefetch 1, the same visibility timeout), counting itself
done as the benchmark's handlers do. Worker: ``celery -A bench.bare_celery worker -Q bare``."""

from __future__ import annotations

from celery import Celery

from calhook.settings import load_settings
from workers.app import celery_config
from workers.connections import redis_client

app = Celery("bare", set_as_current=True)
app.conf.update(celery_config(load_settings()))
app.conf.update(task_default_queue="bare", worker_send_task_events=False)


@app.task(name="bare.noop")
def noop(payload: object) -> None:
    redis_client().incr("bench:done")
