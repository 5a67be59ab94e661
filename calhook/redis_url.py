"""``REDIS_URL``: one server, or a master found through Redis Sentinel.

Two forms are accepted, and only these:

* ``redis://[[user]:password@]host[:port][/db]`` (also ``rediss://`` for TLS and
  ``unix:///path?db=0``): one server, as redis-py reads it;
* ``redis+sentinel://[[user]:password@]host1[:port],host2[:port],…/master_name[/db]``: the
  sentinels (port 26379 unless given) and the name they monitor the master under. The user and
  password are the master's; the sentinels' own, if they need one, go in the query:
  ``?sentinel_password=…`` (and ``sentinel_username=…``).

Every process asks the sentinels for the master when it connects, and again after a connection
fails or the server it reached says it is a replica, so a failover is followed without a restart.
This module only reads the URL (standard library only); :mod:`calhook.store.connect` builds the
clients and the Celery broker settings from it.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_DIRECT_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password")
_FORM = "redis+sentinel://[:password@]host1:26379,host2:26379/master_name/0"


class RedisURLError(ValueError):
    """Raised for a REDIS_URL that is neither of the accepted forms; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A master named ``master_name`` that ``sentinels`` monitor."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = dataclasses.field(default=None, repr=False)
    password: str | None = dataclasses.field(default=None, repr=False)
    sentinel_username: str | None = dataclasses.field(default=None, repr=False)
    sentinel_password: str | None = dataclasses.field(default=None, repr=False)

    def describe(self) -> str:
        """The URL without its secrets, for logs and the status page."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"{SENTINEL_SCHEME}://{hosts}/{self.master_name}/{self.db}"


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The Sentinel target ``url`` names, None for a plain server URL; RedisURLError otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise RedisURLError(f"REDIS_URL {redact(url)!r} has no scheme; use redis:// or {_FORM}")
    scheme = scheme.lower()
    if scheme in _DIRECT_SCHEMES:
        return None
    if scheme in ("sentinel", "redis-sentinel", "rediss+sentinel"):
        raise RedisURLError(
            f"REDIS_URL scheme {scheme}:// is not supported; name Sentinel as {_FORM}"
            + (" (TLS to Sentinel is not supported yet)" if scheme.startswith("rediss") else "")
        )
    if scheme != SENTINEL_SCHEME:
        raise RedisURLError(
            f"REDIS_URL scheme {scheme}:// is not supported; use redis://, rediss://, unix:// "
            f"or {_FORM}"
        )
    return _sentinel(rest)


def _sentinel(rest: str) -> SentinelTarget:
    # urlsplit reads one host only, so the authority is cut by hand: userinfo@host,host/path?query
    authority, _, path_query = rest.partition("/")
    authority, _, query = authority.partition("?")
    path, _, path_q = path_query.partition("?")
    query = query or path_q
    userinfo, at, hosts_part = authority.rpartition("@")
    sentinels = tuple(_host(item) for item in hosts_part.split(",") if item.strip())
    if not sentinels:
        raise RedisURLError(f"REDIS_URL names no sentinel; use {_FORM}")
    segments = [unquote(s) for s in path.split("/") if s]
    if not segments:
        raise RedisURLError(f"REDIS_URL names no master after the sentinels; use {_FORM}")
    if len(segments) > 2:
        raise RedisURLError(f"REDIS_URL path must be /master_name or /master_name/db; use {_FORM}")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise RedisURLError(f"REDIS_URL database {segments[1]!r} is not a number")
        db = int(segments[1])
    options = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(options) - set(_SENTINEL_QUERY))
    if unknown:
        raise RedisURLError(
            f"REDIS_URL option(s) {', '.join(unknown)} not understood; a Sentinel URL takes "
            f"{' and '.join(_SENTINEL_QUERY)}"
        )
    username, password = None, None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return SentinelTarget(
        sentinels=sentinels,
        master_name=segments[0],
        db=db,
        username=username,
        password=password,
        sentinel_username=_one(options, "sentinel_username"),
        sentinel_password=_one(options, "sentinel_password"),
    )


def _host(item: str) -> tuple[str, int]:
    parsed = urlsplit(f"//{item.strip()}")
    try:
        port = parsed.port or SENTINEL_PORT
    except ValueError:
        raise RedisURLError(f"REDIS_URL sentinel {item.strip()!r} has a bad port") from None
    if not parsed.hostname:
        raise RedisURLError(f"REDIS_URL sentinel {item.strip()!r} has no host")
    return parsed.hostname, port


def _one(options: dict[str, list[str]], name: str) -> str | None:
    values = options.get(name)
    return unquote(values[-1]) if values else None


def redact(url: str) -> str:
    """``url`` without its credentials, to show in a message."""
    _, at, tail = url.rpartition("@")
    return f"***@{tail}" if at else url


def validate(url: str) -> str:
    """``url`` if it is an accepted REDIS_URL; RedisURLError with the reason otherwise."""
    target = parse_sentinel(url)
    if target is None:
        scheme = url.partition("://")[0].lower()
        parsed = urlsplit(url)
        if scheme != "unix" and not parsed.hostname:
            raise RedisURLError(f"REDIS_URL {redact(url)!r} names no host")
        try:
            parsed.port  # noqa: B018  (reading it validates it)
        except ValueError:
            raise RedisURLError(f"REDIS_URL {redact(url)!r} has a bad port") from None
    return url


def describe(url: str) -> str:
    """``url`` without its password, for logs and the status page."""
    target = parse_sentinel(url)
    if target is not None:
        return target.describe()
    parsed = urlsplit(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@", 1)
