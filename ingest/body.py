"""Reading a delivery's body within its limits, and parsing it as JSON within ours.

Limits on the hot path cost next to nothing when they are not near: a body that arrived with
the request head is read without a timer, and nesting is only measured when the body holds
more opening brackets than the depth allowed (a bound on its depth, counted in C).

What orjson does with numbers, and what we answer:

- an integer within [-2**63, 2**64): exact;
- an integer beyond that: orjson reads it as a float, losing digits. Accepted all the same:
  the body is stored byte for byte as sent (parked and dead-letter records keep it), and
  refusing it would lose an authentic event Calenso may never send again (DESIGN.md rule 1);
- a number beyond a double's range (``1e400``): orjson cannot read it, nor can any worker;
  refused with a 422 that says so, not the generic 400 of malformed JSON;
- a tiny one (``1e-400``) becomes 0.0 and a long fraction is rounded, as any double reader does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ingest.errors import (
    BodyTimeout,
    BodyTooLarge,
    JsonTooDeep,
    MalformedJson,
    NotJson,
    NumberOutOfRange,
    UnreadableBody,
)

_JSON_TYPES = ("application/json", "text/json")
BOM = b"\xef\xbb\xbf"


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes (413), arrived within ``timeout_s`` (408)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body of {request.content_length} bytes exceeds {limit}")
    try:
        if request.content.is_eof():
            # Arrived with the head (most webhooks): no timer to arm.
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the body did not arrive within {timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"body exceeds {limit} bytes") from None
    except ConnectionError:
        raise UnreadableBody("the connection closed before the whole body arrived") from None


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _printable(header: str) -> str:
    # aiohttp hands over bytes that are not UTF-8 as lone surrogates, which no JSON encoder
    # writes: escape them (and anything else outside printable ASCII), and keep it short.
    return header[:100].encode("ascii", "backslashreplace").decode("ascii")


def parse_json(body: bytes, content_type: str, max_depth: int) -> Any:
    """The body's JSON value, or the IngestError that says why there is none we can use.

    ``body`` is the one the ingress keeps: a UTF-8 byte order mark is already gone (app.py).
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if reason.startswith("number is infinity"):
            raise NumberOutOfRange("a number is too large for a double") from None
        if reason.startswith(("depth limit exceeded", "recursion limit exceeded")):
            raise JsonTooDeep(f"objects and arrays nest deeper than {max_depth}") from None
        # A body that parses is taken whatever its declared type: an authentic event must not
        # be refused for a header. One that does not parse is answered by what it claimed.
        declared_json = content_type in _JSON_TYPES or content_type.endswith("+json")
        if declared_json or not content_type:
            raise MalformedJson(f"body is not valid JSON: {exc}") from None
        raise NotJson(f"expected a JSON body, got {_printable(content_type)}") from None
    if body.count(b"{") + body.count(b"[") > max_depth and _deeper_than(value, max_depth):
        raise JsonTooDeep(f"objects and arrays nest deeper than {max_depth}")
    return value
