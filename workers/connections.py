"""The worker process's Redis client, made once per process from the settings."""

from __future__ import annotations

import functools

import redis

from calhook.settings import get_settings


@functools.cache
def redis_client() -> redis.Redis:
    """A synchronous client on the broker Redis; redis-py resets its pool after a fork."""
    settings = get_settings()
    return redis.Redis.from_url(
        settings.require_redis_url(),
        socket_timeout=10,
        socket_connect_timeout=10,
        health_check_interval=30,
    )
