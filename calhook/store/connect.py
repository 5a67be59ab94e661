"""The store's objects and Redis clients, built from the settings of this process.

Every client of calhook is made here, from ``REDIS_URL``: a plain one for ``redis://``, or for
``redis+sentinel://`` one whose pool asks the sentinels for the master at each new connection
and drops a connection that finds a replica (redis-py's Sentinel pools), so a failover is
followed without a restart. The Celery broker settings come from the same URL
(:func:`celery_broker`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff

from calhook.redis_url import SentinelTarget, parse_sentinel
from calhook.settings import Settings
from calhook.store.pairs import PairStore
from calhook.store.scripts import Clock, Scripts


def clock(settings: Settings) -> Clock:
    """The timings every script takes, from the settings."""
    return Clock(
        recover_s=settings.recovery_s,
        lease_s=settings.lease_s,
        done_ttl_s=settings.ledger_ttl_s,
        keep_ttl_s=settings.retention_s,
        trail_ttl_s=settings.trail_keep_s,
    )


def pair_store(client: redis.Redis, settings: Settings) -> PairStore:
    """The pair store on ``client`` with the timings of ``settings``."""
    return PairStore(Scripts(client, clock(settings)))


# redis-py leaves its Sentinel classes untyped.
_SyncSentinel: Any = redis.sentinel.Sentinel
_AsyncSentinel: Any = redis.asyncio.sentinel.Sentinel

# A sentinel that does not answer is skipped after this long; the next one is asked.
SENTINEL_TIMEOUT_S = 1.0


def _sentinel_kwargs(target: SentinelTarget, *, asyncio: bool = False) -> dict[str, Any]:
    # No retry of a sentinel that refuses or times out: the next one is asked at once. (redis-py's
    # default retries a refusing sentinel for seconds before the next is asked, and every new
    # connection asks again.)
    no_retry = (redis.asyncio.retry.Retry if asyncio else redis.retry.Retry)(NoBackoff(), 0)
    kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "retry": no_retry,
    }
    if target.sentinel_username:
        kwargs["username"] = target.sentinel_username
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _master_kwargs(target: SentinelTarget, kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = {"db": target.db, **kwargs}
    if target.username:
        merged["username"] = target.username
    if target.password:
        merged["password"] = target.password
    return merged


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A client on the server, or the Sentinel-monitored master, that ``url`` names."""
    target = parse_sentinel(url)
    if target is None:
        return redis.Redis.from_url(url, **kwargs)
    manager = _SyncSentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target))
    client: redis.Redis = manager.master_for(
        target.master_name, redis_class=_SyncFollower, **_master_kwargs(target, kwargs)
    )
    return client


class _SyncFollower(redis.Redis):
    """A client on a Sentinel-monitored master that also closes its sentinels' connections."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            sentinel.close()


class _AsyncFollower(redis.asyncio.Redis):
    """The asyncio twin of :class:`_SyncFollower`."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            await sentinel.aclose()


class _BlockingSentinelPool(
    redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """A Sentinel pool that waits for a free connection instead of failing past its size."""


def async_client(url: str, *, blocking: bool = False, **kwargs: Any) -> redis.asyncio.Redis:
    """An asyncio client on what ``url`` names, for the running loop. ``blocking``: a pool that
    waits for a free connection (up to ``timeout``) rather than raising past
    ``max_connections``."""
    target = parse_sentinel(url)
    if target is None:
        if not blocking:
            return redis.asyncio.Redis.from_url(url, **kwargs)
        # from_pool: the client owns the pool, so closing it closes the connections.
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, **kwargs)
        return redis.asyncio.Redis.from_pool(pool)
    manager = _AsyncSentinel(
        list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, asyncio=True)
    )
    pool_class = (
        _BlockingSentinelPool if blocking else redis.asyncio.sentinel.SentinelConnectionPool
    )
    client: redis.asyncio.Redis = manager.master_for(
        target.master_name,
        redis_class=_AsyncFollower,
        connection_pool_class=pool_class,
        **_master_kwargs(target, kwargs),
    )
    return client


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's ``broker_url`` and the transport options it needs for ``url``.

    kombu names Sentinel as ``sentinel://host:port;sentinel://host2:port/db`` plus the
    ``master_name`` option; every sentinel is listed, so one that is down is skipped.
    """
    target = parse_sentinel(url)
    if target is None:
        return url, {}
    auth = ""
    if target.username or target.password:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    broker = ";".join(
        f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels
    )
    return broker, {
        "master_name": target.master_name,
        "sentinel_kwargs": _sentinel_kwargs(target),
    }


# What an asyncio twin of a client keeps of its connection settings.
_TWIN_KWARGS = (
    "host", "port", "path", "db", "username", "password", "client_name",
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval",
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data",
    "ssl_check_hostname", "ssl_min_version", "ssl_ciphers",
)  # fmt: skip


def async_twin(client: redis.Redis) -> redis.asyncio.Redis:
    """An asyncio client on the same server and database as ``client``, with its timeouts and
    credentials; for the running loop (a client belongs to the loop it was made on)."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _TWIN_KWARGS}
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        sentinels = pool.sentinel_manager.sentinels
        addresses = [(s.connection_pool.connection_kwargs["host"],
                      s.connection_pool.connection_kwargs["port"]) for s in sentinels]  # fmt: skip
        sentinel_kwargs = {
            k: v for k, v in sentinels[0].connection_pool.connection_kwargs.items()
            if k in _TWIN_KWARGS and k not in ("host", "port")
        }  # fmt: skip
        sentinel_kwargs["retry"] = redis.asyncio.retry.Retry(NoBackoff(), 0)
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        manager = _AsyncSentinel(addresses, sentinel_kwargs=sentinel_kwargs)
        twin: redis.asyncio.Redis = manager.master_for(
            pool.service_name, redis_class=_AsyncFollower, **kwargs
        )
        return twin
    kind = {
        "UnixDomainSocketConnection": redis.asyncio.UnixDomainSocketConnection,
        "SSLConnection": redis.asyncio.SSLConnection,
    }.get(pool.connection_class.__name__, redis.asyncio.Connection)
    # from_pool: the client owns the pool, so closing it closes the connections.
    return redis.asyncio.Redis.from_pool(
        redis.asyncio.ConnectionPool(connection_class=kind, **kwargs)
    )
