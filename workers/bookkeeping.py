"""Recording endings as they come, many per round trip (a group commit).

Each ending a worker process produces (from any task thread, or from the async handlers on its
event loop) is handed to the process's :class:`Recorder`, which records it with ``finish.lua``
at once if no call is in flight, or with whatever else arrived while the one in flight ran. An
ending is thus recorded one round trip after it is known, never held back to fill a batch, and
under load one call records many. A sync handler does not wait for its ending to be recorded
before the next event of its batch runs; the task waits for all of them before it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from calhook.store.pairs import AsyncPairStore, Ending

Entry = tuple[str, str, Ending]  # (pair, throughput key, ending)


class Recorder:
    """The group commit of one event loop's endings."""

    def __init__(self, store: AsyncPairStore, owner: Callable[[], str], retry_s: float) -> None:
        self._store = store
        self._owner = owner
        self._retry_s = retry_s
        self._waiting: list[tuple[Entry, asyncio.Future[str]]] = []
        self._flushing = False

    async def record(self, pair: str, throughput_key: str, ending: Ending) -> str:
        """Record ``ending``; its result from ``finish.lua``: 'ok', 'late' or 'lost'."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append(((pair, throughput_key, ending), future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def aclose(self) -> None:
        """Close its client (tests; a worker's loop lives as long as its process)."""
        await self._store.scripts.client.aclose()

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    results = await self._finish([entry for entry, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._flushing = False

    async def _finish(self, entries: list[Entry]) -> list[str]:
        """Through a Redis blip: the effects happened, so losing their outcomes would run them
        again. Tried for half a lease (the heartbeat keeps the pairs meanwhile)."""
        async for try_ in AsyncRetrying(
            stop=stop_after_delay(self._retry_s),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(redis.RedisError),
            reraise=True,
        ):
            with try_:
                return await self._store.finish_many(self._owner(), entries)
        raise AssertionError("unreachable")  # pragma: no cover
