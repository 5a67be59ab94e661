"""``GET /openapi.json``: the ingress described in OpenAPI 3.1, written by hand.

It must stay truthful, because schemathesis holds the app to it: every status an operation can
answer is declared, with the content type it really has. Two kinds of answer come from aiohttp
itself, before any calhook code runs: a 400 for a request aiohttp's parser refuses (a header
line longer than ``CALHOOK_MAX_HEADER_BYTES``, more than ``CALHOOK_MAX_HEADERS`` headers, broken
chunked framing, bytes that are not HTTP; made our JSON error by ``ingest.server``), and a 405
for a method a path does not have (JSON, from our error middleware). The document is built once per
app, with the settings that change what a client sees.
"""

from __future__ import annotations

from typing import Any

import orjson

from calhook import __version__
from calhook.settings import Settings

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ERROR}}
    answer: dict[str, Any] = {"description": description, "content": content}
    if retry_after:
        answer["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before sending again.",
                "schema": {"type": "string"},
            }
        }
    return answer


def _parser_error() -> dict[str, Any]:
    return {
        "description": "aiohttp's HTTP parser refused the request before calhook saw it: a header "
        "line too long, too many headers, broken framing.",
        "content": {"application/json": {"schema": _ERROR}},
    }


def _webhook(settings: Settings, named: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    if named:
        parameters.append(
            {
                "name": "endpoint",
                "in": "path",
                "required": True,
                "description": "A named endpoint of CALHOOK_ENDPOINTS.",
                "schema": {"type": "string"},
            }
        )
    for name, description in (
        ("webhook-id", "Standard Webhooks endpoints: the message id."),
        ("webhook-timestamp", "Standard Webhooks endpoints: Unix seconds, within 5 minutes."),
        ("webhook-signature", "Standard Webhooks endpoints: space-separated `v1,<base64>`."),
        ("X-Forwarded-For", "Read only when the peer is in CALHOOK_TRUSTED_PROXIES."),
    ):
        parameters.append(
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": description,
                "schema": {"type": "string"},
            }
        )
    limit = settings.max_body_bytes
    return {
        "post": {
            "operationId": "receiveNamed" if named else "receive",
            "summary": "Receive one Calenso webhook"
            + (" on a named endpoint" if named else " on the default endpoint"),
            "description": "Answers 2xx only once the event is durable (Redis, or the local "
            "spool). Unknown event types and payloads that fail their schema are accepted and "
            "parked, never refused. A body that parses as JSON is taken whatever its "
            "Content-Type.",
            "security": [{"secretHeader": []}, {"standardWebhooks": []}],
            "parameters": parameters,
            "requestBody": {
                "required": True,
                "description": f"At most {limit} bytes.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Event"}}},
            },
            "responses": {
                "200": {
                    "description": "The same bytes arrived on this endpoint before: not queued "
                    "again.",
                    "content": {"application/json": {"schema": _answer("duplicate")}},
                },
                "202": {
                    "description": "Accepted: the event is durable and queued for dispatch.",
                    "content": {"application/json": {"schema": _answer("accepted")}},
                },
                "400": _error(
                    "Malformed JSON (declared as JSON or undeclared), or a body cut short; "
                    "or a request aiohttp's parser refused.",
                ),
                "401": _error("Missing or wrong secret header, or Standard Webhooks signature."),
                "403": _error("The client address is not in CALHOOK_ALLOWED_IPS."),
                "404": _error("No endpoint of that name."),
                "408": _error("The body did not arrive within CALHOOK_BODY_TIMEOUT_S."),
                "413": _error(f"The body is larger than {limit} bytes."),
                "415": _error("Not JSON, and declared as something else."),
                "422": _error(
                    "JSON, but not usable: not an envelope (an object with a string `type` and "
                    "an object `data`), nested deeper than CALHOOK_MAX_JSON_DEPTH, or a number "
                    "beyond a double's range."
                ),
                "431": _error("The request head is larger than CALHOOK_MAX_HEADER_BYTES."),
                "503": _error(
                    "CALHOOK_MAX_CONCURRENT requests are in progress, or the event could not be "
                    "stored: send it again.",
                    retry_after=True,
                ),
            },
        }
    }


def _answer(status: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status", "event_id"],
        "properties": {
            "status": {"const": status},
            "event_id": {"type": "string", "description": "UUIDv7 of the event."},
        },
    }


def _admin(operation: str, summary: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "description": "With CALHOOK_ADMIN_PORT set, served only on the admin listener "
            "(no token there) and 404 here; otherwise behind CALHOOK_ADMIN_TOKEN, and 404 "
            "without one.",
            "security": [{"adminToken": []}],
            "responses": {
                "200": {"description": summary, "content": content},
                "400": _parser_error(),
                "401": _error("Missing or wrong admin token."),
                "404": _error("Not served here: no admin token, or a separate admin port."),
            },
        }
    }


def _plain_get(operation: str, summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "security": [],
            "responses": {
                "200": {
                    "description": summary,
                    "content": {"application/json": {"schema": schema}},
                },
                "400": _parser_error(),
            },
        }
    }


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of an ingress with these settings."""
    ready = {
        "type": "object",
        "required": ["status", "redis", "spooling", "spool_depth"],
        "properties": {
            "status": {"const": "ready"},
            "redis": {"enum": ["ok", "unavailable"]},
            "spooling": {"type": "boolean"},
            "spool_depth": {"type": "integer", "minimum": 0},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "calhook ingress",
            "version": __version__,
            "description": "Receives Calenso webhooks and makes each durable before answering. "
            'Every error is JSON: {"status": "error", "error": <code>, "detail": <text>}.',
        },
        "paths": {
            "/webhooks/calenso": _webhook(settings, named=False),
            "/webhooks/calenso/{endpoint}": _webhook(settings, named=True),
            "/healthz": _plain_get(
                "healthz",
                "Liveness: the process answers.",
                {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"const": "ok"}},
                },
            ),
            "/readyz": _plain_get(
                "readyz", "Readiness: events can be made durable (Redis or spool).", ready
            ),
            "/openapi.json": _plain_get("openapi", "This document.", {"type": "object"}),
            "/metrics": _admin(
                "metrics",
                "Prometheus metrics of this process.",
                {"text/plain": {"schema": {"type": "string"}}},
            ),
            "/status": _admin(
                "status",
                "The read-only status page.",
                {"text/html": {"schema": {"type": "string"}}},
            ),
        },
        "components": {
            "schemas": {
                "Event": {
                    "type": "object",
                    "description": "A Calenso envelope. Only these two fields are checked here; "
                    "the rest (``created``, the event's own fields) is the dispatch task's "
                    "business, kept as sent.",
                    "required": ["type", "data"],
                    "properties": {
                        "type": {"type": "string", "examples": ["customer.created"]},
                        "data": {"type": "object"},
                    },
                    "additionalProperties": True,
                },
                "Error": {
                    "type": "object",
                    "required": ["status", "error", "detail"],
                    "properties": {
                        "status": {"const": "error"},
                        "error": {"type": "string", "description": "A machine-readable code."},
                        "detail": {"type": "string", "description": "What is wrong."},
                    },
                    "additionalProperties": False,
                },
            },
            "securitySchemes": {
                "secretHeader": {
                    "type": "apiKey",
                    "in": "header",
                    "name": settings.auth_header,
                    "description": "One of the endpoint's accepted secrets, verbatim (named "
                    "endpoints may use another header).",
                },
                "standardWebhooks": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "webhook-signature",
                    "description": "Endpoints with scheme standard-webhooks: HMAC-SHA256 of "
                    "`{webhook-id}.{webhook-timestamp}.{body}` under a whsec_ secret.",
                },
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def render(settings: Settings) -> bytes:
    """The document as JSON bytes, built once."""
    return orjson.dumps(document(settings))
