"""Fixtures of the step-by-step core tests (tests/support/core_rig.py): their own database."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from calhook.settings import Settings
from calhook.store.connect import pair_store
from calhook.store.pairs import PairStore
from tests.support.core_rig import DB, LEASE_S, RECOVER_S, Timeline


@pytest.fixture
def url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{DB}"


@pytest.fixture
def db(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S)


@pytest.fixture
def core(db: redis.Redis, settings: Settings) -> PairStore:
    return pair_store(db, settings)


@pytest.fixture
def batch_settings(make_settings: Callable[..., Settings]) -> Settings:
    """Leases and recovery of a minute, batches of up to 64 (tests/workers/test_batch*.py)."""
    return make_settings(lease_s=LEASE_S, recovery_s=RECOVER_S, batch_max=64)


@pytest.fixture
def timeline() -> Timeline:
    """The one clock of a step-by-step test (tests/support/core_rig.py)."""
    return Timeline()
