"""The worker process's Redis clients, made from the settings: a synchronous one per process, and
an asyncio one per event loop (for async handlers)."""

from __future__ import annotations

import functools

import redis
import redis.asyncio

from calhook.settings import get_settings
from calhook.store.connect import async_client, sync_client
from workers.looplocal import LoopLocal


@functools.cache
def redis_client() -> redis.Redis:
    """A synchronous client on the broker Redis (through Sentinel if REDIS_URL names it);
    redis-py resets its pool after a fork."""
    settings = get_settings()
    return sync_client(
        settings.require_redis_url(),
        socket_timeout=10,
        socket_connect_timeout=10,
        health_check_interval=30,
    )


def _new_async_client() -> redis.asyncio.Redis:
    settings = get_settings()
    # A pool that waits for a free connection rather than failing: redis-py's default pool
    # raises MaxConnectionsError past 100, which an async handler running more events at once
    # (CALHOOK_ASYNC_CONCURRENCY) would turn into failed attempts.
    return async_client(
        settings.require_redis_url(),
        blocking=True,
        max_connections=max(100, settings.async_concurrency),
        timeout=10,
        socket_timeout=10,
        socket_connect_timeout=10,
        health_check_interval=30,
    )


async def _close(client: redis.asyncio.Redis) -> None:
    await client.aclose()


_async_clients: LoopLocal[redis.asyncio.Redis] = LoopLocal(_new_async_client, _close)


async def async_redis_client() -> redis.asyncio.Redis:
    """An asyncio client on the broker Redis, one per running event loop (a client's connections
    belong to the loop that opened them); closed when that loop shuts down."""
    return await _async_clients.get()
