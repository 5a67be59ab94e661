"""The typed keys of the ingress app's state, shared by the app and its admin surfaces."""

from __future__ import annotations

from aiohttp import web
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from calhook.settings import Settings
from ingest.auth import Authenticator
from ingest.clients import ClientFilter
from ingest.durable import DurableWriter
from ingest.metrics import IngressMetrics
from ingest.publisher import Publisher


class InFlight:
    """Webhook requests in progress in this process, against ``CALHOOK_MAX_CONCURRENT``."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.count = 0
        self.limit = limit


SETTINGS = web.AppKey("settings", Settings)
ENDPOINTS = web.AppKey("endpoints", dict[str, Authenticator])
CLIENTS = web.AppKey("clients", ClientFilter)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
OPENAPI = web.AppKey("openapi", bytes)
REDIS = web.AppKey("redis", Redis)
PUBLISHER = web.AppKey("publisher", Publisher)
WRITER = web.AppKey("writer", DurableWriter)
METRICS = web.AppKey("metrics", IngressMetrics)
STATUS_REDIS = web.AppKey("status_redis", SyncRedis)
