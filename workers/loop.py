"""One asyncio event loop per worker process, for async handlers and batched bookkeeping.

Celery runs tasks on its own threads or processes; an ``async def`` handler runs here instead,
on a loop that a daemon thread of the process keeps running, so the events of a batch wait on
their I/O together. After a fork (Celery's prefork pool) the child starts its own loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("calhook.worker")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the `fast` extra is not installed
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``loop`` for the life of the process. A handler that raises SystemExit or
    KeyboardInterrupt makes asyncio re-raise it out of the loop: the loop runs on, rather than
    leave every later async batch of the process waiting for a loop that stopped."""
    while True:
        try:
            loop.run_forever()
        except BaseException:
            log.exception("the event loop stopped on an exception; it runs on")
            continue
        return


class ProcessLoop:
    """The process's event loop, started on first use (and again after a fork)."""

    def __init__(self) -> None:
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop of this process."""
        if self._pid != os.getpid() or self._loop is None:
            with self._lock:
                if self._pid != os.getpid() or self._loop is None:
                    loop = _new_loop()
                    threading.Thread(
                        target=_run_forever, args=(loop,), name="calhook-loop", daemon=True
                    ).start()
                    self._loop, self._pid = loop, os.getpid()
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the loop from any other thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result from this (non-loop) thread.

        If the wait is interrupted (a soft time limit, a shutdown), the coroutine is cancelled
        rather than left running behind the caller's back.
        """
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


process_loop = ProcessLoop()
"""The loop of this process."""
