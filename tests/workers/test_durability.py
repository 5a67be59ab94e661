"""The worker's start-up check of the broker Redis."""

from __future__ import annotations

from pathlib import Path

import redis

from calhook.redis_server import RedisServer
from workers.durability import durability_problems


def test_a_redis_with_aof_and_noeviction_passes(redis_db: redis.Redis, tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert durability_problems(client) == []
        client.close()


def test_no_aof_and_eviction_are_each_named(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("appendonly", "no")
        client.config_set("maxmemory-policy", "allkeys-lru")

        problems = durability_problems(client)

        client.close()
    assert len(problems) == 2
    assert problems[0].startswith("appendonly is off")
    assert problems[1].startswith("maxmemory-policy is allkeys-lru")
