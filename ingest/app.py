"""The ingress: a thin aiohttp app that makes each authentic Calenso delivery durable, then answers.

Order of checks on ``POST /webhooks/calenso[/{endpoint}]``: endpoint → secret → size → JSON →
envelope (a string ``type`` and an object ``data``) → dedup and enqueue in one Redis script →
``202 {"status": "accepted", "event_id": …}``. Everything past the envelope (the event's own
schema, unknown types) is the dispatch task's business: such events are accepted and parked there,
never refused here, because Calenso may not send them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from calhook.constants import DISPATCH_QUEUE, dedup_key
from calhook.ids import new_event_id
from calhook.messages import Delivery, dispatch_message
from calhook.settings import DEFAULT_ENDPOINT, Endpoint, Settings, SettingsError
from ingest.auth import authenticate
from ingest.durable import DurableWriter, NotDurable
from ingest.errors import (
    BodyTooLarge,
    IngestError,
    MalformedJson,
    NotJson,
    Unauthorized,
    Unavailable,
    UnknownEndpoint,
    UnusableEnvelope,
)
from ingest.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ingest.metrics import IngressMetrics
from ingest.publisher import Outgoing, Publisher
from ingest.spool import Spool, SpoolError
from ingest.status import authorised
from ingest.status import page as status_page
from schemas import EnvelopeError, parse_envelope

log = logging.getLogger("calhook.ingest")

SETTINGS = web.AppKey("settings", Settings)
ENDPOINTS = web.AppKey("endpoints", dict[str, Endpoint])
REDIS = web.AppKey("redis", Redis)
PUBLISHER = web.AppKey("publisher", Publisher)
WRITER = web.AppKey("writer", DurableWriter)
METRICS = web.AppKey("metrics", IngressMetrics)
STATUS_REDIS = web.AppKey("status_redis", SyncRedis)

_JSON_TYPES = ("application/json", "text/json")


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map every refusal to its status and a JSON body that says what is wrong."""
    try:
        return await handler(request)
    except IngestError as exc:
        return _json(exc.status, {"status": "error", "error": exc.code, "detail": exc.message})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json(exc.status, {"status": "error", "error": exc.reason, "detail": exc.reason})


def _endpoints(settings: Settings) -> dict[str, Endpoint]:
    endpoints = {DEFAULT_ENDPOINT: settings.endpoint(DEFAULT_ENDPOINT)}
    endpoints.update(settings.endpoints)
    open_ = sorted(name for name, ep in endpoints.items() if ep is not None and not ep.secrets)
    if open_ and not settings.allow_unauthenticated:
        raise SettingsError(
            f"no secret configured for endpoint(s) {', '.join(open_)}: set CALHOOK_AUTH_SECRETS "
            "(and secrets in CALHOOK_ENDPOINTS), or CALHOOK_ALLOW_UNAUTHENTICATED=true for "
            "development"
        )
    if open_:
        log.warning("accepting unauthenticated webhooks", extra={"endpoints": open_})
    return {name: ep for name, ep in endpoints.items() if ep is not None}


def _parse_json(body: bytes, content_type: str) -> Any:
    try:
        # Some senders (PHP among them) prefix a UTF-8 byte order mark; JSON does not allow it.
        return orjson.loads(body.removeprefix(b"\xef\xbb\xbf"))
    except orjson.JSONDecodeError as exc:
        # A body that parses is taken whatever its declared type: an authentic event must not
        # be refused for a header. One that does not parse is answered by what it claimed.
        declared_json = content_type in _JSON_TYPES or content_type.endswith("+json")
        if declared_json or not content_type:
            raise MalformedJson(f"body is not valid JSON: {exc}") from None
        raise NotJson(f"expected a JSON body, got {content_type}") from None


async def receive(request: web.Request) -> web.Response:
    """Accept one Calenso delivery, and measure it; see the module docstring."""
    started = time.perf_counter()
    name = request.match_info.get("endpoint", DEFAULT_ENDPOINT)
    label = name if name in request.app[ENDPOINTS] else "unknown"
    metrics = request.app[METRICS]
    status = 500
    try:
        response = await _receive(request, name)
        status = response.status
        return response
    except IngestError as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(label, str(status)).inc()
        metrics.ack_seconds.labels(label).observe(time.perf_counter() - started)


async def _receive(request: web.Request, name: str) -> web.Response:
    endpoint = request.app[ENDPOINTS].get(name)
    if endpoint is None:
        raise UnknownEndpoint(f"no endpoint named {name!r}")
    authenticate(endpoint, request.headers)

    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body of {request.content_length} bytes exceeds {limit}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"body exceeds {limit} bytes") from None

    try:
        # The header as sent: aiohttp reports a missing one as application/octet-stream.
        declared = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        envelope = parse_envelope(_parse_json(body, declared))
    except EnvelopeError as exc:
        raise UnusableEnvelope(str(exc)) from None

    event_id = new_event_id()
    message = dispatch_message(Delivery(event_id, body.decode(), name, time.time()), envelope.type)
    digest = hashlib.sha256(name.encode() + b"\0" + body).hexdigest()
    try:
        first = await request.app[WRITER].write(Outgoing(dedup_key(digest), event_id, message))
    except NotDurable as exc:
        log.error("not durable", extra={"type": envelope.type[:100], "error": str(exc)})
        raise Unavailable("the event could not be stored; send it again") from None

    metrics = request.app[METRICS]
    if first is not None:
        log.info("duplicate", extra={"event_id": first, "type": envelope.type[:100]})
        metrics.event(name, envelope.type, "duplicate")
        return _json(200, {"status": "duplicate", "event_id": first})
    metrics.event(name, envelope.type, "spool" if request.app[WRITER].spooling else "redis")
    log.info(
        "accepted",
        extra={
            "event_id": event_id,
            "type": envelope.type[:100],
            "endpoint": name,
            "bytes": len(body),
        },
    )
    return _json(202, {"status": "accepted", "event_id": event_id})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: events can be made durable, in Redis or in the spool (which is reported)."""
    writer = request.app[WRITER]
    try:
        async with asyncio.timeout(request.app[SETTINGS].redis_timeout_s):
            await request.app[REDIS].ping()
        redis_state = "ok"
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("readiness: redis unavailable", extra={"error": repr(exc)})
        redis_state = "unavailable"
    return _json(
        200,
        {
            "status": "ready",
            "redis": redis_state,
            "spooling": writer.spooling,
            "spool_depth": writer.spool_depth(),
        },
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this ingress process."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def status(request: web.Request) -> web.StreamResponse:
    """The read-only status page (404 unless CALHOOK_ADMIN_TOKEN is set)."""
    token = request.app[SETTINGS].admin_token.get_secret_value()
    if not token:
        raise web.HTTPNotFound()
    if not authorised(request, token):
        raise Unauthorized("the status page needs the admin token")
    queues = {DISPATCH_QUEUE, "audit", "crm", "notify"}
    return await status_page(request, request.app[STATUS_REDIS], queues)


async def _durable_writer(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = Redis.from_url(
        settings.require_redis_url(),
        socket_timeout=max(settings.redis_timeout_s, 1.0),
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    publisher = Publisher(
        redis,
        queue=DISPATCH_QUEUE,
        dedup_ttl_s=settings.dedup_ttl_s,
        batch_max=settings.publish_batch_max,
        timeout_s=settings.redis_timeout_s,
        watchdog_s=settings.watchdog_s,
    )
    writer = DurableWriter(
        redis, publisher, Spool(Path(settings.spool_dir)), trail_ttl_s=settings.trail_ttl_s
    )
    publisher.on_batch = app[METRICS].batch_size.observe
    app[METRICS].watch_spool(writer.spool_depth, lambda: writer.spooling)
    app[REDIS] = redis
    app[PUBLISHER] = publisher
    # The status page's reads are the CLI's synchronous code, run in a thread (ingest/status.py).
    app[STATUS_REDIS] = SyncRedis.from_url(
        settings.require_redis_url(), socket_timeout=2, socket_connect_timeout=2
    )
    app[WRITER] = writer
    await publisher.start()
    try:
        await writer.start()
    except SpoolError as exc:
        raise SettingsError(f"CALHOOK_SPOOL_DIR cannot be used: {exc}") from exc
    yield
    # Graceful shutdown: requests still in flight get their answer from these last writes.
    await writer.close()
    await redis.aclose()
    app[STATUS_REDIS].close()


def create_app(settings: Settings) -> web.Application:
    """Build the ingress app; refuses to build without secrets unless explicitly allowed."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_errors])
    app[SETTINGS] = settings
    app[ENDPOINTS] = _endpoints(settings)
    app[METRICS] = IngressMetrics()
    app.cleanup_ctx.append(_durable_writer)
    app.add_routes(
        [
            web.post("/webhooks/calenso", receive),
            web.post("/webhooks/calenso/", receive),
            web.post("/webhooks/calenso/{endpoint}", receive),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/status", status),
        ]
    )
    return app
