"""The Celery app: reliability settings, the dispatch task and one task per registered handler.

Settings follow ../shared/RELIABILITY.md; each is there for a named way Celery on Redis loses or
repeats work. ``workers.celery_app`` holds the app for ``celery -A``; ``calhook worker`` uses it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import setup_logging, worker_ready, worker_shutting_down

from calhook import logs
from calhook.constants import DISPATCH_QUEUE, DISPATCH_TASK, HANDLER_TASK
from calhook.settings import Settings, get_settings
from calhook.store.connect import celery_broker, pair_store, sync_client
from calhook.store.pairs import PairStore
from workers import kombu_fixes, legacy, routes
from workers.connections import redis_client
from workers.dispatch import Dispatcher
from workers.heartbeat import Heartbeat
from workers.registry import load_handlers, registry
from workers.runner import HandlerRunner

log = logging.getLogger("calhook.worker")


# The consumer's connection: a dead master (or a network that drops packets silently) surfaces
# as an error within seconds instead of a BRPOP waiting forever on a half-open socket, and the
# worker reconnects, through the sentinels to the new master when REDIS_URL names Sentinel.
BROKER_SOCKET = {
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "health_check_interval": 10,
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings; each line guards against one failure in RELIABILITY.md (item number)."""
    broker_url, sentinel = celery_broker(settings.require_redis_url())
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        # 3, 10: redeliver only after the longest a task may run; set where kombu reads it.
        "broker_transport_options": {**transport, **sentinel, **BROKER_SOCKET},
        "result_backend_transport_options": transport,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(1, settings.task_time_limit_s * 9 // 10),
        # 1, 2: ack after the handler ran; a killed child, or one past its hard time limit,
        # puts the message back. If it does not, the pair's lease runs out and the scheduler
        # queues it again; a pair started too often without finishing ends as poison.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_timeout": False,
        # 6: take one message at a time, so nothing waits behind a slow task or a dead worker.
        "worker_prefetch_multiplier": 1,
        # 11: no result keys piling up in the broker.
        "task_ignore_result": True,
        "result_backend": None,
        # 8: a lost broker connection must not leave a task running while it is redelivered.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # 7: on SIGTERM (remapped to SIGQUIT by `calhook worker`), finish running tasks for a
        # while, then requeue what is left.
        "worker_soft_shutdown_timeout": settings.soft_shutdown_s,
        # No ETA tasks to requeue (retries live in the pair states): an idle worker stops now.
        "worker_enable_soft_shutdown_on_idle": False,
        # 2: a leaking handler gets its child replaced rather than OOM-killed mid-task.
        "worker_max_memory_per_child": settings.worker_max_memory_kb or None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": DISPATCH_QUEUE,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        # Task events cost the worker's consumer a publish per task state (a fifth of its time
        # in the benchmark); Flower enables them on the workers it watches, so they are off
        # until someone looks.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
    }


@functools.cache
def _pairs() -> PairStore:
    return pair_store(redis_client(), get_settings())


@functools.cache
def _heartbeat() -> Heartbeat:
    return Heartbeat(_pairs(), get_settings().lease_s)


@functools.cache
def _dispatcher() -> Dispatcher:
    settings = get_settings()
    return Dispatcher(
        _pairs(),
        registry,
        _heartbeat(),
        settings.zone,
        max_starts=settings.max_deliveries,
        batch_max=settings.batch_max,
        runner=_runner(),
    )


@functools.cache
def _runner() -> HandlerRunner:
    return HandlerRunner(_pairs(), registry, _heartbeat(), get_settings())


@contextlib.contextmanager
def _requeue_on_error() -> Iterator[None]:
    """Put the message back if calhook itself fails (Redis unreachable, a bug).

    Celery acks a late-ack task that raised (RELIABILITY.md item 12), which would lose the
    event. Handler errors never get here: the runner retries or dead-letters them. What does
    is requeued; the delivery counters stop a message that fails every time.
    """
    try:
        yield
    except Exception as exc:
        log.error("task failed, requeued", extra={"error": repr(exc)[:500]})
        # A moment's pause, so a passing Redis hiccup does not burn every delivery at once.
        time.sleep(1.0)
        raise Reject(exc, requeue=True) from exc


@functools.cache
def _consumed(app: Celery) -> frozenset[str]:
    """The queues this worker consumes (its ``-Q``): a dispatch runs the new messages of their
    handlers itself when nothing waits before them. Empty outside a worker started with -Q."""
    selected = app.amqp.queues.consume_from
    return frozenset(selected) if selected else frozenset()


def _register_tasks(app: Celery) -> None:
    # shared=False: the tasks belong to this app; Celery would otherwise add them to every app
    # created later in the process (a second app, a test's), as a duplicate name.
    # Messages name event ids, never bodies (the body is read when the attempt starts).
    # ``**_unknown``: a newer calhook may add arguments; an older worker must still run the task
    # rather than fail before our guard and have Celery ack it away.
    @app.task(name=DISPATCH_TASK, bind=True, shared=False)
    def dispatch(
        self: Task[Any, Any],
        /,
        *,
        ids: list[str] | None = None,
        seq: int | None = None,
        **_unknown: Any,
    ) -> None:
        with _requeue_on_error():
            if ids is None and legacy.is_legacy(_unknown):
                legacy.take_over(_pairs(), _unknown, None, DISPATCH_QUEUE)
                return
            _dispatcher().dispatch(ids or [], seq, run_here=_consumed(self.app))

    @app.task(name=HANDLER_TASK, bind=True, shared=False)
    def handle(
        self: Task[Any, Any],
        /,
        *,
        handler: str,
        ids: list[str] | None = None,
        seq: int | None = None,
        **_unknown: Any,
    ) -> None:
        with _requeue_on_error():
            queue = (self.request.delivery_info or {}).get("routing_key") or ""
            if ids is None and legacy.is_legacy(_unknown):
                legacy.take_over(_pairs(), _unknown, handler, queue)
                return
            _runner().run(handler, ids or [], seq, queue)


def create_celery(settings: Settings | None = None) -> Celery:
    """The Celery app with calhook's settings, its handler modules loaded and their tasks."""
    settings = settings or get_settings()
    load_handlers(settings)
    kombu_fixes.apply()
    app = Celery("calhook", set_as_current=True)
    app.conf.update(celery_config(settings))
    _register_tasks(app)

    @setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        logs.configure(settings.log_format, settings.log_level)

    publisher: list[routes.Publisher] = []

    @worker_ready.connect(weak=False)
    def _publish_routes(sender: Any = None, **_: Any) -> None:
        # What this worker serves, for `calhook handlers` (workers/routes.py); from the main
        # process, which knows the queues it consumes.
        queues = _consumed(app) or {DISPATCH_QUEUE, *registry.queues()}
        described = routes.describe(registry, queues, routes.worker_id())
        # A client of its own: the withdrawal runs in Celery's signal handler, which must not
        # wait for a pool lock the thread it interrupted holds (the solo pool runs tasks there).
        client = sync_client(
            settings.require_redis_url(), socket_timeout=5, socket_connect_timeout=5
        )
        publisher.append(routes.Publisher(client, described).start())

    @worker_shutting_down.connect(weak=False)
    def _withdraw_routes(**_: Any) -> None:
        # When the worker shuts down (after the soft shutdown's wait: SIGTERM is remapped).
        while publisher:
            publisher.pop().stop()

    return app
