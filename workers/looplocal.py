"""Objects bound to an event loop (aiohttp sessions, redis.asyncio clients), one per loop.

An aiohttp ``ClientSession`` or a ``redis.asyncio`` client belongs to the loop it was made on;
used from another loop it fails (or hangs). Async handlers run on the worker process's loop
(:mod:`workers.loop`), a new one after a fork, while tests and ``asyncio.run`` bring loops of
their own. So such an object is made lazily, inside the running loop, and kept per loop: never
made once per process (a ``functools.cache``) outside any loop.

It is closed when its loop shuts down in order: the first use on a loop starts an async generator
there whose ``finally`` closes the object, and every orderly end of a loop (``asyncio.run``,
``asyncio.Runner``, pytest-asyncio) runs ``loop.shutdown_asyncgens()``, which finalises it. So no
"Unclosed client session" warning is left behind. The worker process's loop runs until the
process exits and keeps its objects as long.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# After a fork, the parent's objects (their sockets, their loop) are kept referenced here and
# never touched: closing them in the child could unregister the parent's sockets from a shared
# epoll instance.
_INHERITED: list[Any] = []


class LoopLocal(Generic[T]):
    """One ``T`` per running event loop: made by ``make`` on first use in that loop, closed by
    ``close`` when the loop shuts down (or on :meth:`aclose`)."""

    def __init__(
        self, make: Callable[[], T], close: Callable[[T], Awaitable[object]] | None = None
    ) -> None:
        self._make = make
        self._close = close
        self._pid = os.getpid()
        self._values: dict[asyncio.AbstractEventLoop, T] = {}
        self._guards: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}

    async def get(self) -> T:
        """The running loop's object, made now if it has none yet."""
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            _INHERITED.append((self._values, self._guards))
            self._values, self._guards, self._pid = {}, {}, os.getpid()
        if loop in self._values:
            return self._values[loop]
        value = self._make()
        self._values[loop] = value
        guard = self._until_shutdown(loop)
        self._guards[loop] = guard
        # The first step registers the generator with the loop (its asyncgen hooks), and
        # leaves it suspended inside the try, so that shutdown_asyncgens runs the finally.
        await anext(guard)
        return value

    async def aclose(self) -> None:
        """Close the running loop's object now, if it has one; the next :meth:`get` makes a new
        one."""
        guard = self._guards.get(asyncio.get_running_loop())
        if guard is not None:
            await guard.aclose()

    async def _until_shutdown(self, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self._guards.pop(loop, None)
            value = self._values.pop(loop)
            if self._close is not None:
                await self._close(value)
