"""Waiting on conditions with a deadline, instead of sleeping a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class Timeout(AssertionError):
    """Raised when a condition did not hold before its deadline."""


def wait_for(condition: Callable[[], T], timeout_s: float = 30.0, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(0.02)


async def await_for(
    condition: Callable[[], T | Awaitable[T]], timeout_s: float = 30.0, what: str = ""
) -> T:
    """Like :func:`wait_for`, without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout_s}s waiting for {what or condition}")
        await asyncio.sleep(0.02)
