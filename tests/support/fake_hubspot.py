"""A fake HubSpot CRM v3 contacts API on 127.0.0.1, for the HubSpot adapter's tests.

It runs its own event loop in a background thread, so the adapter on the test's event loop and a
Celery worker in another process can both call it. It implements the subset calhook uses:

- ``POST /crm/v3/objects/contacts/batch/upsert``: create or update by the inputs' ``idProperty``
- ``GET /crm/v3/objects/contacts/{id}`` (``?idProperty=`` to read by a unique property)
- ``DELETE /crm/v3/objects/contacts/{id}`` and ``POST …/batch/archive``: archive by record id

Every call is recorded (:meth:`FakeHubSpot.calls`) with the time it arrived. A wrong or missing
Bearer token gets 401. Faults are injected per path pattern or for the next N calls::

    fake = FakeHubSpot(token="t").start()
    fake.inject(Fault.rate_limited(retry_after_s=1), times=1, path="*/batch/upsert")
    fake.inject(Fault.server_error(), times=2)
    ...
    fake.stop()
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import fnmatch
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.support.threaded import ThreadedServer

CONTACTS = "/crm/v3/objects/contacts"
# HubSpot's default contact properties calhook writes, plus the custom unique one.
DEFAULT_PROPERTIES = frozenset(
    {
        "firstname",
        "lastname",
        "email",
        "phone",
        "salutation",
        "hs_language",
        "address",
        "zip",
        "city",
        "country",
        "company",
        "date_of_birth",
        "lifecyclestage",
        "calenso_uuid",
    }
)
DEFAULT_UNIQUE = frozenset({"email", "calenso_uuid"})
# What a healthy answer carries (values of a portal with a 190 / 10 s burst limit).
HEALTHY_RATE_HEADERS = {
    "X-HubSpot-RateLimit-Max": "190",
    "X-HubSpot-RateLimit-Remaining": "189",
    "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
    "X-HubSpot-RateLimit-Secondly": "19",
    "X-HubSpot-RateLimit-Secondly-Remaining": "18",
}


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_body(message: str, category: str, **more: Any) -> dict[str, Any]:
    """A HubSpot-style error answer."""
    return {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
        **more,
    }


@dataclass(frozen=True, slots=True)
class Call:
    """One request the fake received; ``at`` is ``time.monotonic()`` when it arrived."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    headers: dict[str, str]
    at: float


@dataclass(frozen=True, slots=True)
class Fault:
    """An answer given instead of the real one (after ``delay_s``; ``passthrough``: the real one
    after the delay). ``echo_headers`` puts the request's headers into the body, like a careless
    gateway."""

    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    passthrough: bool = False
    echo_headers: bool = False

    @classmethod
    def rate_limited(
        cls, retry_after_s: float | None = None, *, interval_ms: int | None = 10_000
    ) -> Fault:
        """429 of the secondly policy; ``Retry-After`` only when given. ``interval_ms=None``
        leaves out the Max/Remaining/Interval headers (only the Secondly ones are sent)."""
        headers = {
            "X-HubSpot-RateLimit-Secondly": "19",
            "X-HubSpot-RateLimit-Secondly-Remaining": "0",
        }
        if interval_ms is not None:
            headers |= {
                "X-HubSpot-RateLimit-Max": "190",
                "X-HubSpot-RateLimit-Remaining": "0",
                "X-HubSpot-RateLimit-Interval-Milliseconds": str(interval_ms),
            }
        if retry_after_s is not None:
            headers["Retry-After"] = f"{retry_after_s:g}"
        body = {
            "status": "error",
            "message": "You have reached your secondly limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": "SECONDLY",
        }
        return cls(status=429, body=body, headers=headers)

    @classmethod
    def server_error(cls) -> Fault:
        return cls(status=500, body=error_body("internal error", "INTERNAL_ERROR"))

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        """The real answer, ``delay_s`` late."""
        return cls(delay_s=delay_s, passthrough=True)

    @classmethod
    def bad_request(cls, message: str, *, echo_headers: bool = False) -> Fault:
        """A permanent 400 as HubSpot words a validation error."""
        body = error_body(
            message,
            "VALIDATION_ERROR",
            errors=[{"message": message, "code": "INVALID_OPTION", "context": {}}],
        )
        return cls(status=400, body=body, echo_headers=echo_headers)

    @classmethod
    def not_found(cls) -> Fault:
        return cls(status=404, body=error_body("Object not found.", "OBJECT_NOT_FOUND"))


@dataclass(slots=True)
class _Rule:
    fault: Fault
    times: int
    path: str | None
    method: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path is None or fnmatch.fnmatchcase(path, self.path)


class FakeHubSpot:
    """The fake server; :meth:`start` it, use :attr:`url`, :meth:`stop` it."""

    def __init__(
        self,
        token: str,
        *,
        properties: frozenset[str] = DEFAULT_PROPERTIES,
        unique_properties: frozenset[str] = DEFAULT_UNIQUE,
    ) -> None:
        self.token = token
        self.properties = properties
        self.unique_properties = unique_properties
        self.url = ""
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._rules: list[_Rule] = []
        self._records: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1001)
        self._server: ThreadedServer | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeHubSpot:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post(f"{CONTACTS}/batch/upsert", self._upsert)
        app.router.add_post(f"{CONTACTS}/batch/archive", self._archive_batch)
        app.router.add_get(f"{CONTACTS}/{{contact_id}}", self._read)
        app.router.add_delete(f"{CONTACTS}/{{contact_id}}", self._archive)
        # A slow answer still in progress must not hold up stop().
        self._server = ThreadedServer(app, shutdown_timeout=0.5).start()
        self.url = self._server.url
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> FakeHubSpot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test controls ---------------------------------------------------------------------

    def inject(
        self, fault: Fault, *, times: int = 1, path: str | None = None, method: str | None = None
    ) -> None:
        """Answer the next ``times`` matching calls with ``fault``; ``path`` is a glob."""
        with self._lock:
            self._rules.append(_Rule(fault, times, path, method))

    def calls(self, *, method: str | None = None, path: str | None = None) -> list[Call]:
        """The calls received so far, oldest first (optionally of one method / path glob)."""
        with self._lock:
            found = list(self._calls)
        return [
            c
            for c in found
            if (method is None or c.method == method.upper())
            and (path is None or fnmatch.fnmatchcase(c.path, path))
        ]

    def contacts(self, *, archived: bool = False) -> list[dict[str, Any]]:
        """Copies of the stored contacts (the live ones, or the archived ones)."""
        with self._lock:
            return [copy.deepcopy(r) for r in self._records.values() if r["archived"] is archived]

    def contact(self, prop: str, value: str) -> dict[str, Any] | None:
        """A copy of the live contact whose ``prop`` is ``value``."""
        with self._lock:
            record = self._find(prop, value)
            return copy.deepcopy(record) if record else None

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._rules.clear()
            self._records.clear()

    # --- the server ------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body: Any = None
        if request.body_exists:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        call = Call(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            json=body,
            headers=dict(request.headers),
            at=time.monotonic(),
        )
        with self._lock:
            self._calls.append(call)
            rule = next((r for r in self._rules if r.matches(request.method, request.path)), None)
            if rule is not None:
                rule.times -= 1
        if rule is not None:
            fault = rule.fault
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if not fault.passthrough:
                answer = fault.body
                if fault.echo_headers:
                    answer = {**(answer or {}), "request": {"headers": call.headers}}
                if answer is None:
                    return web.Response(status=fault.status, headers=fault.headers)
                return web.json_response(answer, status=fault.status, headers=fault.headers)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(
                error_body(
                    "Authentication credentials not found. This API supports OAuth 2.0 "
                    "authentication and you can find more details at "
                    "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                    "INVALID_AUTHENTICATION",
                ),
                status=401,
            )
        response = await handler(request)
        response.headers.update(HEALTHY_RATE_HEADERS)
        return response

    def _find(self, prop: str, value: str) -> dict[str, Any] | None:
        for record in self._records.values():
            if not record["archived"] and record["properties"].get(prop) == value:
                return record
        return None

    def _validation_error(self, message: str) -> web.Response:
        return web.json_response(
            error_body(message, "VALIDATION_ERROR", errors=[{"message": message}]), status=400
        )

    async def _upsert(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list) or not inputs:
            return self._validation_error("inputs: must be a non-empty list")
        results = []
        with self._lock:
            for item in inputs:
                id_property = item.get("idProperty") or request.query.get("idProperty")
                id_value = item.get("id")
                properties = item.get("properties") or {}
                if id_property not in self.unique_properties:
                    return self._validation_error(
                        f"{id_property} is not a unique property of contacts"
                    )
                if not isinstance(id_value, str) or not id_value:
                    return self._validation_error("id: must be a non-empty string")
                unknown = sorted(set(properties) - self.properties)
                if unknown:
                    return self._validation_error(f"Property values were not valid: {unknown}")
                if not all(isinstance(v, str) for v in properties.values()):
                    return self._validation_error("Property values were not valid: not a string")
                now = _now_iso()
                record = self._find(id_property, id_value)
                new = record is None
                if record is None:
                    record_id = str(next(self._ids))
                    record = {
                        "id": record_id,
                        "properties": {"hs_object_id": record_id, id_property: id_value},
                        "createdAt": now,
                        "archived": False,
                    }
                    self._records[record_id] = record
                record["properties"].update(properties)
                record["updatedAt"] = now
                results.append({**copy.deepcopy(record), "new": new})
        return web.json_response(
            {
                "status": "COMPLETE",
                "results": results,
                "startedAt": _now_iso(),
                "completedAt": _now_iso(),
            }
        )

    async def _read(self, request: web.Request) -> web.Response:
        value = request.match_info["contact_id"]
        id_property = request.query.get("idProperty")
        with self._lock:
            if id_property is None:
                record = self._records.get(value)
                record = record if record and not record["archived"] else None
            elif id_property not in self.unique_properties:
                return self._validation_error(f"{id_property} is not a unique property")
            else:
                record = self._find(id_property, value)
            if record is None:
                return web.json_response(
                    error_body(f"Object not found.  objectId: {value}", "OBJECT_NOT_FOUND"),
                    status=404,
                )
            return web.json_response(copy.deepcopy(record))

    def _archive_id(self, record_id: str) -> bool:
        record = self._records.get(record_id)
        if record is None or record["archived"]:
            return False
        record["archived"] = True
        record["archivedAt"] = _now_iso()
        return True

    async def _archive(self, request: web.Request) -> web.Response:
        with self._lock:
            archived = self._archive_id(request.match_info["contact_id"])
        if not archived:
            return web.json_response(
                error_body("Object not found.", "OBJECT_NOT_FOUND"), status=404
            )
        return web.Response(status=204)

    async def _archive_batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            for item in body.get("inputs") or []:
                self._archive_id(str(item.get("id")))
        return web.Response(status=204)
