"""A token bucket in Redis, shared by every worker that calls one destination.

Celery's ``rate_limit`` is per worker process (RELIABILITY.md item 13); a CRM that allows ten
calls a second allows them for all of us together. The bucket's clock is Redis's own, so workers
with skewed clocks agree. :class:`RateLimiter` takes tokens from synchronous code,
:class:`AsyncRateLimiter` from coroutines (redis.asyncio, waiting without blocking the event
loop); both share the bucket of the same name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis
import redis.asyncio

from calhook.store.keys import RATELIMIT
from workers.crm.client import CrmClient
from workers.crm.contact import Contact
from workers.errors import Defer

# KEYS[1] bucket; ARGV[1] tokens per second, ARGV[2] capacity.
# Takes a token and returns 0, or returns how many ms until one is there (and takes nothing).
_TAKE_LUA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now_ms
tokens = math.min(capacity, tokens + (now_ms - at) * rate / 1000)
local wait_ms = 0
if tokens >= 1 then tokens = tokens - 1 else wait_ms = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity * 1000 / rate) + 1000)
return wait_ms
"""


class _Bucket:
    """The bucket's name and numbers, and what to do with an answer of the script."""

    def __init__(self, name: str, rate_per_s: float, max_wait_s: float) -> None:
        self._key = f"{RATELIMIT}{name}"
        self._rate = rate_per_s
        self._capacity = max(1.0, rate_per_s)
        self._max_wait_s = max_wait_s

    def _wait_s(self, wait_ms: int, deadline: float) -> float:
        """How long to wait for the next token; past the deadline, :class:`Defer`."""
        if time.monotonic() + wait_ms / 1000 > deadline:
            raise Defer("the CRM's rate limit is used up", after_s=wait_ms / 1000)
        return wait_ms / 1000


class RateLimiter(_Bucket):
    """``rate_per_s`` calls a second for everyone using ``name``, in bursts up to one second's."""

    def __init__(
        self, client: redis.Redis, name: str, rate_per_s: float, max_wait_s: float = 10.0
    ) -> None:
        super().__init__(name, rate_per_s, max_wait_s)
        self._take = client.register_script(_TAKE_LUA)

    def acquire(self) -> None:
        """Wait for a token; past ``max_wait_s``, raise :class:`Defer` (the same attempt waits,
        no step of the retry schedule is spent)."""
        deadline = time.monotonic() + self._max_wait_s
        while True:
            wait_ms = int(self._take(keys=[self._key], args=[self._rate, self._capacity]))
            if wait_ms == 0:
                return
            time.sleep(self._wait_s(wait_ms, deadline))


class AsyncRateLimiter(_Bucket):
    """:class:`RateLimiter` for coroutines: the same bucket, taken through redis.asyncio.

    ``client`` gives the running event loop's client (e.g.
    :func:`workers.connections.async_redis_client`): one limiter serves every loop.
    """

    def __init__(
        self,
        client: Callable[[], Awaitable[redis.asyncio.Redis]],
        name: str,
        rate_per_s: float,
        max_wait_s: float = 10.0,
    ) -> None:
        super().__init__(name, rate_per_s, max_wait_s)
        self._client = client

    async def acquire(self) -> None:
        """Wait for a token, letting the loop run meanwhile; past ``max_wait_s``, raise
        :class:`Defer` (the same attempt waits, no step of the retry schedule is spent)."""
        deadline = time.monotonic() + self._max_wait_s
        # A script object per call: it is bound to a client, and the client to a loop.
        take = (await self._client()).register_script(_TAKE_LUA)
        while True:
            wait_ms = int(await take(keys=[self._key], args=[self._rate, self._capacity]))
            if wait_ms == 0:
                return
            await asyncio.sleep(self._wait_s(wait_ms, deadline))


@dataclass(frozen=True, slots=True)
class RateLimitedCrm:
    """A CRM client whose every call first takes a token from a shared bucket."""

    inner: CrmClient
    limiter: AsyncRateLimiter

    async def upsert(self, contact: Contact, *, idempotency_key: str) -> None:
        await self.limiter.acquire()
        await self.inner.upsert(contact, idempotency_key=idempotency_key)

    async def delete(self, calenso_uuid: str, *, idempotency_key: str) -> None:
        await self.limiter.acquire()
        await self.inner.delete(calenso_uuid, idempotency_key=idempotency_key)

    async def close(self) -> None:
        await self.inner.close()
