"""Fixtures of the ingress tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from tests.support.proxy import SlowProxy


@pytest.fixture
async def slow_redis(redis_url: str) -> AsyncIterator[SlowProxy]:
    """A proxy in front of the test Redis whose answers can be held back (``delay_s``)."""
    target = urlsplit(redis_url)
    proxy = SlowProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()
