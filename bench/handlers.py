"""The handlers of the end-to-end benchmark, loaded by the worker as a handler module.

``BENCH_HANDLER=noop``: does nothing but count itself done. ``BENCH_HANDLER=io``: waits on a
local HTTP server that answers after 50 ms (bench/slow.py), as a CRM call would, on a
synchronous httpx client (a pool thread waits per call), then counts. ``BENCH_HANDLER=io_async``:
the same call as an ``async def`` on aiohttp, run on the worker process's event loop
(workers/loop.py), so the events of a batch wait on the server together. The bare Celery task
(bench/bare_celery.py) counts the same way, so every side pays one Redis INCR per event.
"""

from __future__ import annotations

import os

import aiohttp
import httpx

from schemas import CURRENT_TYPES
from workers.connections import async_redis_client, redis_client
from workers.looplocal import LoopLocal
from workers.registry import HandlerContext, handler

DONE_KEY = "bench:done"
MODE = os.environ.get("BENCH_HANDLER", "noop")
# Far above what one worker process has in flight (a few batches of 64), so the handler never
# waits for a connection and the figure is the worker's, not the pool's.
CONNECTION_LIMIT = 512

if MODE == "noop":

    @handler(*CURRENT_TYPES, queue="bench", name="bench.noop")
    def noop(event: object, ctx: HandlerContext) -> None:
        redis_client().incr(DONE_KEY)

elif MODE == "io":
    _http = httpx.Client(
        timeout=5.0,
        limits=httpx.Limits(
            max_connections=CONNECTION_LIMIT, max_keepalive_connections=CONNECTION_LIMIT
        ),
    )

    @handler(*CURRENT_TYPES, queue="bench", name="bench.io")
    def wait_on_io(event: object, ctx: HandlerContext) -> None:
        _http.get(os.environ["BENCH_SLOW_URL"]).raise_for_status()
        redis_client().incr(DONE_KEY)

elif MODE == "io_async":
    # As the CRM and notify handlers do: an aiohttp session per event loop, made inside it on
    # first use (workers/looplocal.py), and the worker's asyncio Redis client of that loop.

    def _session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT),
            timeout=aiohttp.ClientTimeout(total=5.0),
        )

    async def _close(session: aiohttp.ClientSession) -> None:
        await session.close()

    _sessions = LoopLocal(_session, _close)

    @handler(*CURRENT_TYPES, queue="bench", name="bench.io_async")
    async def wait_on_io_async(event: object, ctx: HandlerContext) -> None:
        session = await _sessions.get()
        async with session.get(os.environ["BENCH_SLOW_URL"]) as response:
            response.raise_for_status()
            await response.read()
        await (await async_redis_client()).incr(DONE_KEY)
