"""An aiohttp app served from a thread of its own, for sync code and other processes to call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from aiohttp import web


class ThreadedServer:
    """Serve ``app`` on 127.0.0.1 (a port the OS picks) from a background thread with its own
    loop; a context manager. ``shutdown_timeout`` bounds how long ``stop`` waits for requests
    still in progress."""

    def __init__(self, app: web.Application, shutdown_timeout: float = 60.0) -> None:
        self.app = app
        self.port = 0
        self._shutdown_timeout = shutdown_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedServer:
        self._thread.start()
        self._run(self._start())
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=self._shutdown_timeout
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            self._run(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
