"""A real Slack-like incoming-webhook server on 127.0.0.1 (aiohttp in a background thread).

It records the JSON of every POST it accepts, and can answer the next calls with a chosen status
and headers instead (429 with ``Retry-After``, 500, 404). Its access log is off: the path of an
incoming webhook is the secret, and the tests check that calhook never logs it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import deque
from types import TracebackType
from typing import Any

from aiohttp import web

WEBHOOK_PATH = "/services/T0TEST/B0TEST/s3cr3tW3bh00kT0k3n"


class ChatServer:
    """The server, as a context manager; ``url`` is what CALHOOK_CHAT_WEBHOOK_URL would hold."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"
        self._posts: list[Any] = []
        self._calls = 0
        self._faults: deque[tuple[int, dict[str, str]]] = deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def fail_next(self, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``times`` calls with ``status`` (and ``headers``), recording nothing."""
        with self._lock:
            self._faults.extend([(status, headers or {})] * times)

    @property
    def posts(self) -> list[Any]:
        """The JSON bodies of the accepted posts, in order."""
        with self._lock:
            return list(self._posts)

    @property
    def calls(self) -> int:
        """How many requests arrived, refused ones included."""
        with self._lock:
            return self._calls

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self._calls += 1
            fault = self._faults.popleft() if self._faults else None
            if fault is None and request.path == WEBHOOK_PATH:
                self._posts.append(body)
        if fault is not None:
            status, headers = fault
            return web.Response(status=status, text="test_fault", headers=headers)
        if request.path != WEBHOOK_PATH:
            return web.Response(status=404, text="no_service")
        return web.Response(text="ok")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def start(self) -> ChatServer:
        """Start serving; returns self."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop serving and end the thread."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._sock.close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
