"""A token bucket in Redis, shared by every worker that calls one destination.

Celery's ``rate_limit`` is per worker process (RELIABILITY.md item 13); a CRM that allows ten
calls a second allows them for all of us together. The bucket's clock is Redis's own, so workers
with skewed clocks agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

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


class RateLimiter:
    """``rate_per_s`` calls a second for everyone using ``name``, in bursts up to one second's."""

    def __init__(
        self, client: redis.Redis, name: str, rate_per_s: float, max_wait_s: float = 10.0
    ) -> None:
        self._key = f"{RATELIMIT}{name}"
        self._rate = rate_per_s
        self._capacity = max(1.0, rate_per_s)
        self._max_wait_s = max_wait_s
        self._take = client.register_script(_TAKE_LUA)

    def acquire(self) -> None:
        """Wait for a token; past ``max_wait_s``, raise :class:`Defer` (the same attempt waits,
        no step of the retry schedule is spent)."""
        deadline = time.monotonic() + self._max_wait_s
        while True:
            wait_ms = int(self._take(keys=[self._key], args=[self._rate, self._capacity]))
            if wait_ms == 0:
                return
            if time.monotonic() + wait_ms / 1000 > deadline:
                raise Defer("the CRM's rate limit is used up", after_s=wait_ms / 1000)
            time.sleep(wait_ms / 1000)


@dataclass(frozen=True, slots=True)
class RateLimitedCrm:
    """A CRM client whose every call first takes a token from a shared bucket."""

    inner: CrmClient
    limiter: RateLimiter

    def upsert(self, contact: Contact, *, idempotency_key: str) -> None:
        self.limiter.acquire()
        self.inner.upsert(contact, idempotency_key=idempotency_key)

    def delete(self, calenso_uuid: str, *, idempotency_key: str) -> None:
        self.limiter.acquire()
        self.inner.delete(calenso_uuid, idempotency_key=idempotency_key)

    def close(self) -> None:
        self.inner.close()
