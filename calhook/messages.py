"""Celery task messages (protocol 2) exactly as kombu's Redis transport stores them.

The ingress must not call Celery's synchronous producer on its event loop (DESIGN.md rule 2), and
the dispatch task fans out in one atomic Redis script; both write this format with a plain
``LPUSH <queue> <message>``. A test publishes with Celery itself and compares, and another has a
real worker consume what we wrote.
"""

from __future__ import annotations

import base64
import os
import socket
from dataclasses import dataclass
from typing import Any

import orjson

from calhook.constants import DISPATCH_QUEUE, DISPATCH_TASK
from calhook.ids import random_uuid4

_ORIGIN = f"calhook@{socket.gethostname()}:{os.getpid()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_message(
    task: str,
    *,
    queue: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    task_id: str | None = None,
    root_id: str | None = None,
    parent_id: str | None = None,
    argsrepr: str = "",
    kwargsrepr: str = "",
) -> bytes:
    """Return the bytes to ``LPUSH`` onto ``queue`` so that a Celery worker runs ``task``.

    ``argsrepr``/``kwargsrepr`` are what Flower and Celery's logs show instead of the arguments;
    callers pass something without personal data, never the payload.
    """
    task_id = task_id or str(random_uuid4())
    body = orjson.dumps([list(args), kwargs or {}, _EMBED])
    message = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": root_id or task_id,
            "parent_id": parent_id,
            "argsrepr": argsrepr,
            "kwargsrepr": kwargsrepr,
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            # The anonymous exchange routes by queue name, so kombu can restore an unacked
            # message to its queue without any exchange binding declared in Redis.
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(random_uuid4()),
        },
    }
    return orjson.dumps(message)


def read_task_message(raw: bytes | str) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
    """Decode a stored message into ``(task name, args, kwargs, headers)``; for tools and tests."""
    message = orjson.loads(raw)
    args, kwargs, _embed = orjson.loads(base64.b64decode(message["body"]))
    headers: dict[str, Any] = message["headers"]
    return str(headers["task"]), list(args), dict(kwargs), headers


@dataclass(frozen=True, slots=True)
class Delivery:
    """An accepted event as the ingress queued it: what every calhook task receives."""

    event_id: str
    body: str
    endpoint: str
    received_at: float

    def task_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the dispatch task (handler tasks add theirs)."""
        return {
            "event_id": self.event_id,
            "body": self.body,
            "endpoint": self.endpoint,
            "received_at": self.received_at,
        }


def dispatch_message(delivery: Delivery, event_type: str) -> bytes:
    """The message of an event's dispatch task; its task id is the event id."""
    return task_message(
        DISPATCH_TASK,
        queue=DISPATCH_QUEUE,
        task_id=delivery.event_id,
        kwargs=delivery.task_kwargs(),
        kwargsrepr=orjson.dumps({"event_id": delivery.event_id, "type": event_type[:100]}).decode(),
    )
