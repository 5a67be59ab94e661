"""The worker's Redis clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from calhook.settings import Settings
from workers import connections


async def test_more_commands_at_once_than_the_pool_holds_wait_rather_than_fail(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async handler may run more events at once than redis-py's default pool allows (100):
    the worker's async client waits for a free connection instead of raising."""
    monkeypatch.setattr(connections, "get_settings", lambda: make_settings())
    client = await connections.async_redis_client()
    try:
        # 150 commands that each hold their connection for a moment.
        await asyncio.gather(
            *(client.blpop([f"test:nothing:{i}"], timeout=0.3) for i in range(150))
        )
    finally:
        await connections._async_clients.aclose()
