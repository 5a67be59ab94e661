"""A real Slack-like incoming-webhook server on 127.0.0.1 (aiohttp in a background thread).

It records the JSON of every POST it accepts, and can answer the next calls with a chosen status
and headers instead (429 with ``Retry-After``, 500, 404). Its access log is off: the path of an
incoming webhook is the secret, and the tests check that calhook never logs it.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from aiohttp import web

from tests.support.threaded import ThreadedServer

WEBHOOK_PATH = "/services/T0TEST/B0TEST/s3cr3tW3bh00kT0k3n"


class ChatServer:
    """The server, as a context manager; ``url`` is what CALHOOK_CHAT_WEBHOOK_URL would hold."""

    def __init__(self) -> None:
        self._posts: list[Any] = []
        self._calls = 0
        self._faults: deque[tuple[int, dict[str, str]]] = deque()
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._server = ThreadedServer(app)

    @property
    def url(self) -> str:
        """The webhook's URL (once started)."""
        return f"{self._server.url}{WEBHOOK_PATH}"

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

    def start(self) -> ChatServer:
        """Start serving; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and end the thread."""
        self._server.stop()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
