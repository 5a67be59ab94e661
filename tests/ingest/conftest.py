"""Fixtures of the ingress tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit

import pytest
import redis

from calhook.settings import Settings
from calhook.store.connect import pair_store
from calhook.store.pairs import PairStore
from tests.ingest.stored import quiet_database
from tests.support.proxy import SlowProxy


@pytest.fixture
async def slow_redis(redis_url: str) -> AsyncIterator[SlowProxy]:
    """A proxy in front of the test Redis whose answers can be held back (``delay_s``)."""
    target = urlsplit(redis_url)
    proxy = SlowProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
def quiet_url(redis_url: str) -> Iterator[str]:
    """Another database of the test Redis, out of reach of the session's worker."""
    with quiet_database(redis_url) as url:
        yield url


@pytest.fixture
def quiet_pairs(quiet_url: str, make_settings: Callable[..., Settings]) -> Iterator[PairStore]:
    """The pair store on :func:`quiet_url`: states laid out there stay as laid out."""
    client = redis.Redis.from_url(quiet_url)
    yield pair_store(client, make_settings(redis_url=quiet_url))
    client.close()
