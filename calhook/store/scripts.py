"""The Lua scripts of the store, loaded in one place.

Each script in ``lua/`` is sent as ``K`` (the key layout of :mod:`calhook.store.keys`), then
``_lib.lua`` (what every transition shares), then the script itself. Every script's ARGV begins
with the same six values (:class:`Clock`), so the clock, the lease and the retention are the
caller's settings, not constants inside Lua.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline

from calhook.store.keys import LUA_KEYS

_LUA_DIR: Final = Path(__file__).with_name("lua")
NAMES: Final = ("accept", "start", "finish", "fan_out", "sweep", "renew", "replay", "purge",
                "forget", "release", "hold")  # fmt: skip


@functools.cache
def source(name: str) -> str:
    """The full text sent to Redis for script ``name``."""
    table = ", ".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in LUA_KEYS.items())
    lib = (_LUA_DIR / "_lib.lua").read_text()
    return f"local K = {{{table}}}\n{lib}\n{(_LUA_DIR / f'{name}.lua').read_text()}"


@dataclass(frozen=True, slots=True)
class Clock:
    """The six values every script starts its ARGV with: the time, the recovery interval and the
    lease (ms), and how long finished states, kept records and trails stay (s)."""

    recover_s: float
    lease_s: float
    done_ttl_s: int
    keep_ttl_s: int
    trail_ttl_s: int

    def head(self, now_s: float | None = None) -> list[int | str]:
        """ARGV[1..6]; the time is Redis's own (``''``) unless ``now_s`` overrides it (tests),
        so hosts with skewed clocks agree on every lease and due time."""
        return [
            "" if now_s is None else int(now_s * 1000),
            int(self.recover_s * 1000),
            int(self.lease_s * 1000),
            self.done_ttl_s,
            self.keep_ttl_s,
            self.trail_ttl_s,
        ]


class Scripts:
    """The store's scripts registered on one synchronous client."""

    def __init__(self, client: redis.Redis, clock: Clock) -> None:
        self.client = client
        self.clock = clock
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}

    def call(
        self,
        name: str,
        args: list[Any],
        keys: list[str] | None = None,
        now_s: float | None = None,
    ) -> Any:
        """Run script ``name`` with the clock's head and then ``args``."""
        return self._scripts[name](keys=keys or [], args=[*self.clock.head(now_s), *args])


class AsyncScripts:
    """The same, on the ingress's asyncio client."""

    def __init__(self, client: AsyncRedis, clock: Clock) -> None:
        self.client = client
        self.clock = clock
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}

    async def call(self, name: str, args: list[Any], keys: list[str] | None = None) -> Any:
        """Run script ``name`` with the clock's head and then ``args``."""
        return await self._scripts[name](keys=keys or [], args=[*self.clock.head(), *args])

    def queue(self, pipe: AsyncPipeline, name: str, args: list[Any], keys: list[str]) -> None:
        """Queue script ``name`` on ``pipe`` by its hash (no SCRIPT EXISTS round trip); a
        NoScriptError in the pipeline's results asks for :meth:`load` and a second try."""
        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *self.clock.head(), *args)

    async def load(self, name: str) -> None:
        """Load script ``name`` (after a restart or a failover emptied the server's cache)."""
        await self.client.script_load(source(name))
