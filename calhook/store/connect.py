"""The store's objects, built from the settings of this process."""

from __future__ import annotations

import redis

from calhook.settings import Settings
from calhook.store.pairs import PairStore
from calhook.store.scripts import Clock, Scripts


def clock(settings: Settings) -> Clock:
    """The timings every script takes, from the settings."""
    return Clock(
        recover_s=settings.recovery_s,
        lease_s=settings.lease_s,
        done_ttl_s=settings.ledger_ttl_s,
        keep_ttl_s=settings.retention_s,
        trail_ttl_s=settings.trail_keep_s,
    )


def pair_store(client: redis.Redis, settings: Settings) -> PairStore:
    """The pair store on ``client`` with the timings of ``settings``."""
    return PairStore(Scripts(client, clock(settings)))
