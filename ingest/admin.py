"""The admin surfaces, ``/metrics`` and ``/status``: behind the admin token on the public port,
or on a listener of their own.

Where they are served is decided once, from the settings:

- ``CALHOOK_ADMIN_PORT`` set: only the admin listener (``CALHOOK_ADMIN_HOST``, loopback by
  default) serves them, without a token; the public port answers 404, as for any unknown path.
  Whoever can reach that address is trusted, so it belongs on a private network.
- otherwise, ``CALHOOK_ADMIN_TOKEN`` set: the public port serves them to
  ``Authorization: Bearer <token>`` (the status page also takes ``?token=`` for a browser);
  anything else is 401.
- neither: they are off (404). Off is the safe default: an operator who forgot the token does
  not publish queue names and traffic figures to the internet.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from calhook.constants import DISPATCH_QUEUE
from calhook.store.connect import pair_store
from calhook.store.health import Health
from ingest.errors import Unauthorized
from ingest.keys import METRICS, SETTINGS, STATUS_REDIS
from ingest.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ingest.status import page as status_page

_STATUS_QUEUES = frozenset({DISPATCH_QUEUE, "audit", "crm", "notify"})
View = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorised(request: web.Request, token: bytes, *, query: bool = False) -> bool:
    """The admin token as ``Authorization: Bearer …`` (or as ``?token=`` when ``query``),
    compared in constant time."""
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not given and query:
        given = request.query.get("token", "")
    return bool(token) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token)


def admin_routes(ingress: web.Application, token: str | None) -> list[web.RouteDef]:
    """``/metrics`` and ``/status`` of ``ingress``; ``token`` None serves them to anyone."""
    secret = token.encode() if token is not None else b""

    async def metrics(request: web.Request) -> web.Response:
        """Prometheus metrics of this ingress process."""
        if token is not None and not authorised(request, secret):
            raise Unauthorized("/metrics needs the admin token (Authorization: Bearer …)")
        body = ingress[METRICS].render()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def status(request: web.Request) -> web.StreamResponse:
        """The read-only status page."""
        if token is not None and not authorised(request, secret, query=True):
            raise Unauthorized("the status page needs the admin token")
        client = ingress[STATUS_REDIS]
        # Built per request: the client is made at startup, after these routes; the page only
        # reads, so no script of the store is ever run from here.
        health = Health(pair_store(client, ingress[SETTINGS]).scripts)
        return await status_page(request, client, set(_STATUS_QUEUES), health)

    return [web.get("/metrics", metrics), web.get("/status", status)]
