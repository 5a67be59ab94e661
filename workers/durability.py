"""A look at the broker Redis at worker start: would it lose queued events?

A Redis that evicts keys under memory pressure, or keeps nothing on disk, silently loses queued
tasks on a full memory or a restart (RELIABILITY.md item 9). Managed Redis often forbids CONFIG;
then we say we could not check, rather than guess.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger("calhook.worker")


def durability_problems(client: redis.Redis) -> list[str]:
    """What makes this Redis unsafe as a broker; empty when it keeps data and never evicts."""
    try:
        config: dict[str, str] = {
            **client.config_get("appendonly"),  # type: ignore[dict-item]
            **client.config_get("maxmemory-policy"),  # type: ignore[dict-item]
        }
    except redis.ResponseError as exc:
        return [f"cannot read the Redis config ({exc}); make sure AOF is on and nothing is evicted"]
    problems = []
    if config.get("appendonly") != "yes":
        problems.append(
            "appendonly is off: a Redis restart loses every queued event (set appendonly yes)"
        )
    policy = config.get("maxmemory-policy", "")
    if policy != "noeviction":
        problems.append(
            f"maxmemory-policy is {policy}: a full Redis drops queued events "
            "(set maxmemory-policy noeviction)"
        )
    return problems


def warn_if_not_durable(client: redis.Redis) -> None:
    """Log a warning for each durability problem of the broker."""
    for problem in durability_problems(client):
        log.warning("broker redis is not durable", extra={"problem": problem})
