"""The ingress: a thin aiohttp app that makes each authentic Calenso delivery durable, then answers.

Order of checks on ``POST /webhooks/calenso[/{endpoint}]``: concurrency (503) → client address
(403) → head size (431) → endpoint (404) → what the headers prove (401: the static secret, or a
Standard Webhooks timestamp) → body size and read deadline (413, 408) → what the body proves (401:
the Standard Webhooks signature) → JSON, its depth and numbers (415/400/422) → envelope (a
string ``type`` and an object ``data``, 422) → dedup and enqueue in one Redis script →
``202 {"status": "accepted", "event_id": …}``. Nothing is enqueued before authentication has
passed. Everything past the envelope (the event's own schema, unknown types) is the dispatch
task's business: such events are accepted and parked there, never refused here, because Calenso
may not send them again.
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
from redis.exceptions import RedisError

from calhook.constants import dedup_key
from calhook.ids import new_event_id
from calhook.messages import event_record
from calhook.settings import DEFAULT_ENDPOINT, Settings, SettingsError, networks
from calhook.store.connect import async_client, sync_client
from calhook.store.connect import clock as store_clock
from ingest.acks import AckConfigError, ack_rule
from ingest.admin import admin_routes
from ingest.auth import Authenticator, authenticator
from ingest.body import BOM, parse_json, read_body
from ingest.clients import ClientFilter
from ingest.durable import DurableWriter, NotDurable
from ingest.errors import (
    HeadersTooLarge,
    IngestError,
    Overloaded,
    Unavailable,
    UnknownEndpoint,
    UnusableEnvelope,
)
from ingest.keys import (
    CLIENTS,
    ENDPOINTS,
    IN_FLIGHT,
    METRICS,
    OPENAPI,
    PUBLISHER,
    REDIS,
    SETTINGS,
    STATUS_REDIS,
    WRITER,
    InFlight,
)
from ingest.metrics import IngressMetrics
from ingest.openapi import render as render_openapi
from ingest.publisher import Outgoing, Publisher
from ingest.spool import Spool, SpoolError
from schemas import EnvelopeError, parse_envelope

__all__ = ["METRICS", "PUBLISHER", "REDIS", "SETTINGS", "WRITER", "create_admin_app", "create_app"]

log = logging.getLogger("calhook.ingest")


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
        response = _json(exc.status, {"status": "error", "error": exc.code, "detail": exc.message})
        response.headers.update(exc.headers)
        if exc.close:
            # Send the answer and hang up now: aiohttp would otherwise linger, reading what is
            # left of the body for up to 10 s, which is what a trickling client wants.
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()  # after flushing the answer
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json(exc.status, {"status": "error", "error": exc.reason, "detail": exc.reason})
        # Keep what the answer says besides its body (Allow on a 405).
        for name, value in exc.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
        return response


def _endpoints(settings: Settings) -> dict[str, Authenticator]:
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
        # Every start says so: an open ingress must never pass for a configured one.
        log.warning("accepting unauthenticated webhooks", extra={"endpoints": open_})
    return {name: authenticator(ep) for name, ep in endpoints.items() if ep is not None}


def _head_bytes(request: web.Request) -> int:
    # The request line and each "name: value\r\n", as they came on the wire.
    size = len(request.method) + len(request.raw_path) + 11
    for name, value in request.raw_headers:
        size += len(name) + len(value) + 4
    return size


async def receive(request: web.Request) -> web.Response:
    """Accept one Calenso delivery, within the concurrency limit, and measure it."""
    started = time.perf_counter()
    app = request.app
    name = request.match_info.get("endpoint", DEFAULT_ENDPOINT)
    label = name if name in app[ENDPOINTS] else "unknown"
    in_flight = app[IN_FLIGHT]
    status = 500
    try:
        if in_flight.count >= in_flight.limit:
            raise Overloaded(f"{in_flight.limit} requests are in progress; send it again")
        in_flight.count += 1
        try:
            response = await _receive(request, name)
        finally:
            in_flight.count -= 1
        status = response.status
        return response
    except IngestError as exc:
        status = exc.status
        raise
    finally:
        metrics = app[METRICS]
        metrics.requests.labels(label, str(status)).inc()
        metrics.ack_seconds.labels(label).observe(time.perf_counter() - started)


async def _receive(request: web.Request, name: str) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    clients = app[CLIENTS]
    if clients.active:
        clients.check(request.remote, request.headers.getall("X-Forwarded-For", ()))
    if _head_bytes(request) > settings.max_header_bytes:
        raise HeadersTooLarge(f"the request head exceeds {settings.max_header_bytes} bytes")
    auth = app[ENDPOINTS].get(name)
    if auth is None:
        raise UnknownEndpoint(f"no endpoint named {name!r}")
    headers = request.headers
    auth.before_body(headers)
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    auth.after_body(headers, body)
    # Some senders (PHP among them) prefix a UTF-8 byte order mark, which JSON does not allow:
    # it goes here, before the dedup digest and the stored body, or dispatch could not parse it.
    body = body.removeprefix(BOM)

    try:
        # The header as sent: aiohttp reports a missing one as application/octet-stream.
        declared = headers.get("Content-Type", "").split(";")[0].strip().lower()
        envelope = parse_envelope(parse_json(body, declared, settings.max_json_depth))
    except EnvelopeError as exc:
        raise UnusableEnvelope(str(exc)) from None

    event_id = new_event_id()
    message = event_record(name, time.time(), envelope.type, body)
    digest = hashlib.sha256(name.encode() + b"\0" + body).hexdigest()
    try:
        first = await app[WRITER].write(Outgoing(dedup_key(digest), event_id, message))
    except NotDurable as exc:
        log.error("not durable", extra={"type": envelope.type[:100], "error": str(exc)})
        raise Unavailable("the event could not be stored; send it again") from None

    metrics = app[METRICS]
    if first is not None:
        log.info("duplicate", extra={"event_id": first, "type": envelope.type[:100]})
        metrics.event(name, envelope.type, "duplicate")
        return _json(200, {"status": "duplicate", "event_id": first})
    metrics.event(name, envelope.type, "spool" if app[WRITER].spooling else "redis")
    # DEBUG: a line per event was a sixth of the event loop's time at saturation; the metrics
    # count every event, and the worker logs each one it dispatches with its event_id.
    log.debug(
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


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of this ingress (no auth: it describes, it reveals no secret)."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def _durable_writer(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    ack = ack_rule(settings)
    # The socket's own timeout is a backstop behind the publisher's deadline, which allows for
    # the WAITAOF and WAIT of a confirmed acknowledgement.
    waits_s = 2 * ack.timeout_s if ack is not None else 0.0
    redis = async_client(
        settings.require_redis_url(),
        socket_timeout=max(settings.redis_timeout_s, 1.0) + waits_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    publisher = Publisher(
        redis,
        clock=store_clock(settings),
        dedup_ttl_s=settings.dedup_ttl_s,
        batch_max=settings.publish_batch_max,
        timeout_s=settings.redis_timeout_s,
        ack=ack,
    )
    writer = DurableWriter(
        redis, publisher, Spool(Path(settings.spool_dir)), trail_ttl_s=settings.trail_keep_s
    )
    publisher.on_batch = app[METRICS].batch_size.observe
    app[METRICS].watch_spool(writer.spool_depth, lambda: writer.spooling)
    app[REDIS] = redis
    app[PUBLISHER] = publisher
    # The status page's reads are the CLI's synchronous code, run in a thread (ingest/status.py).
    app[STATUS_REDIS] = sync_client(
        settings.require_redis_url(), socket_timeout=2, socket_connect_timeout=2
    )
    app[WRITER] = writer
    try:
        await publisher.start()
    except AckConfigError as exc:
        await redis.aclose()
        app[STATUS_REDIS].close()
        raise SettingsError(str(exc)) from exc
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
    """Build the ingress app; refuses to build without secrets unless explicitly allowed.

    ``/metrics`` and ``/status`` are routed here only without a separate admin listener, and
    then only with an admin token (ingest/admin.py); :func:`create_admin_app` serves them there.
    """
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_errors])
    app[SETTINGS] = settings
    app[ENDPOINTS] = _endpoints(settings)
    app[CLIENTS] = ClientFilter(networks(settings.allowed_ips), networks(settings.trusted_proxies))
    app[IN_FLIGHT] = InFlight(settings.max_concurrent)
    app[OPENAPI] = render_openapi(settings)
    app[METRICS] = IngressMetrics()
    app.cleanup_ctx.append(_durable_writer)
    app.add_routes(
        [
            web.post("/webhooks/calenso", receive),
            web.post("/webhooks/calenso/", receive),
            web.post("/webhooks/calenso/{endpoint}", receive),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/openapi.json", openapi),
        ]
    )
    token = settings.admin_token.get_secret_value()
    if settings.admin_port is None and token:
        app.add_routes(admin_routes(app, token))
    elif settings.admin_port is None:
        log.info("/metrics and /status are off: set CALHOOK_ADMIN_PORT or CALHOOK_ADMIN_TOKEN")
    return app


def create_admin_app(ingress: web.Application) -> web.Application:
    """The admin listener's app: ``/metrics`` and ``/status`` of ``ingress``, without a token.

    Start it after ``ingress`` (whose start-up opens the status page's Redis client).
    """
    admin = web.Application(middlewares=[_errors])
    admin.add_routes(admin_routes(ingress, None))
    return admin
