"""A steady load of webhook posts, as senders make it, and what each of them saw.

Each post goes out on its own task at its scheduled time, whether earlier ones have been answered
or not: a sender does not slow down because the receiver is in trouble, so a slow answer shows as
a long latency, not as a lower rate. A :class:`Watch` samples a condition of the test process (the
ingress spooling) at a fixed pace, to say when it held and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sent:
    """One post: its number, when it went out and was answered (``time.monotonic``), and the
    answer's status and event id (for a 202; else the answer's text)."""

    n: int
    at: float
    answered: float
    status: int
    detail: str

    @property
    def latency_s(self) -> float:
        return self.answered - self.at


@dataclass
class SteadyLoad:
    """Calls ``send(n)`` ``rate_per_s`` times a second, ``n`` counting from 0, until stopped."""

    send: Callable[[int], Awaitable[tuple[int, str]]]
    rate_per_s: float
    sent: list[Sent] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _runner: asyncio.Task[None] | None = None
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self._runner = asyncio.create_task(self._run(), name="steady-load")

    async def stop(self) -> None:
        """Stop sending, and wait for the answer to every post already sent."""
        assert self._runner is not None
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def _run(self) -> None:
        n = 0
        while True:
            due = self.started + n / self.rate_per_s
            if (ahead := due - time.monotonic()) > 0:
                await asyncio.sleep(ahead)
            task = asyncio.create_task(self._one(n, due))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            n += 1

    async def _one(self, n: int, due: float) -> None:
        # The latency counts from when the post was due: a loop too busy to send it on time is
        # part of what the sender waits.
        try:
            status, detail = await self.send(n)
        except Exception as exc:  # a sender sees a dropped connection as a failed post
            status, detail = 0, repr(exc)
        self.sent.append(Sent(n, due, time.monotonic(), status, detail))

    def accepted(self) -> list[str]:
        """The event ids of the posts answered 202, in the order they were sent."""
        return [s.detail for s in sorted(self.sent, key=lambda s: s.n) if s.status == 202]

    def statuses(self) -> Counter[int]:
        return Counter(s.status for s in self.sent)

    def slowest(self) -> Sent:
        return max(self.sent, key=lambda s: s.latency_s)

    def latency_quantile(self, q: float) -> float:
        latencies = sorted(s.latency_s for s in self.sent)
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]


@dataclass
class Watch:
    """Samples ``condition`` every ``every_s`` until stopped: when it first and last held, and
    for how long in all (``time.monotonic``)."""

    condition: Callable[[], bool]
    every_s: float = 0.02
    first: float | None = None
    last: float | None = None
    held_s: float = 0.0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch")

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        before = time.monotonic()
        while True:
            now = time.monotonic()
            if self.condition():
                self.first = self.first if self.first is not None else now
                self.last = now
                self.held_s += now - before
            before = now
            await asyncio.sleep(self.every_s)
