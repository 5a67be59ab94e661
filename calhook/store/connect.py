"""The store's objects, built from the settings of this process."""

from __future__ import annotations

import redis
import redis.asyncio

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
    kind = {
        "UnixDomainSocketConnection": redis.asyncio.UnixDomainSocketConnection,
        "SSLConnection": redis.asyncio.SSLConnection,
    }.get(pool.connection_class.__name__, redis.asyncio.Connection)
    # from_pool: the client owns the pool, so closing it closes the connections.
    return redis.asyncio.Redis.from_pool(
        redis.asyncio.ConnectionPool(connection_class=kind, **kwargs)
    )
