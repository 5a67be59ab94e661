"""Celery task messages (protocol 2) as kombu's Redis transport stores them, and event records.

The ingress must not call Celery's synchronous producer on its event loop (DESIGN.md rule 2), and
every transition that queues work does so inside its Lua script; calhook's own messages are
therefore built in Lua (``push`` in ``calhook/store/lua/_lib.lua``) and carry event ids, never
bodies. :func:`task_message` builds the same format in Python for tools, the benchmark's recipe
and the tests, which publish with Celery itself and compare, and have a real worker consume what
the scripts wrote.
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Any

import orjson

from calhook.constants import DISPATCH_TASK
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
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, kwargs, _embed = orjson.loads(body)
    headers: dict[str, Any] = message["headers"]
    return str(headers["task"]), list(args), dict(kwargs), headers


def event_record(endpoint: str, received_at: float, event_type: str, body: bytes) -> bytes:
    """What the ingress stores (and spools) of an accepted event: three header lines, then the
    body as received (``calhook/store/lua/accept.lua`` splits it)."""
    kind = event_type[:100].replace("\n", " ").replace("\r", " ")
    return f"{endpoint}\n{received_at!r}\n{kind}\n".encode() + body


def record_from_message(message: bytes) -> bytes | None:
    """The record of an event spooled by an older calhook as a Celery dispatch message, or
    None if ``message`` is not one."""
    try:
        task, _, kwargs, _ = read_task_message(message)
        if task != DISPATCH_TASK:
            return None
        return event_record(
            str(kwargs["endpoint"]), float(kwargs["received_at"]), "", str(kwargs["body"]).encode()
        )
    except (ValueError, KeyError, TypeError, IndexError):
        return None
