"""A workaround for kombu 5.7's Redis transport, applied when the Celery app is built.

When a worker's broker connection drops while it holds an unacknowledged message (a task in
hand) and waits on ``BRPOP`` for a free pool slot, Celery's consumer first lets kombu drop the
transport's client (``Connection.collect``), then closes the connection, and the channel's close
restores the unacknowledged messages through a client it rebuilds from that dropped one:
``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is not one of the
connection errors Celery ignores on the way to reconnecting, so the worker logs "Unrecoverable
error" and exits, after a Redis restart or a Sentinel failover alike
(tests/faults/test_failover.py shows it on real processes).

The fix makes that rebuild fail as what it is, a connection error: Celery ignores it and
reconnects. The messages it could not restore stay in kombu's ``unacked`` hash; kombu restores
them after its visibility timeout, and calhook's sweep queues their pairs again well before
(a copy of a message whose pair already ran is a no-op).
"""

from __future__ import annotations

import functools
from typing import Any

import redis.exceptions
from kombu.transport import redis as kombu_redis


def apply() -> None:
    """Patch kombu's Redis channel once (idempotent)."""
    channel: Any = kombu_redis.Channel
    if getattr(channel._connparams, "_calhook_fix", False):
        return
    original = channel._connparams

    @functools.wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was closed")
        return original(self, asynchronous)

    _connparams._calhook_fix = True  # type: ignore[attr-defined]
    channel._connparams = _connparams
