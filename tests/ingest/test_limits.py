"""Limits, on a real ingress served by ``ingest.server`` (as ``calhook serve`` runs it) and
talked to over raw sockets: each limit gets its status, a JSON error where calhook answers,
and nothing reaches the queue.

Given a small limit, when a client exceeds it (slowly, in bulk, or in shape), then it is
refused or cut off, and a client within the limits is still served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
import pytest
import redis

from calhook.settings import Settings
from ingest.server import listening
from tests.conftest import FIXTURES, SECRET
from tests.ingest.stored import queued_ids
from tests.ingest.wire import closed_by_server, exchange, head, read_answer

BODY = (FIXTURES / "customer.created.nested.json").read_bytes()


def queued(redis_db: redis.Redis) -> int:
    return len(queued_ids(redis_db))


async def test_a_body_trickled_slower_than_the_deadline_is_408_and_the_connection_closed(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    async with listening(make_settings(body_timeout_s=0.5), "127.0.0.1", 0) as bound:
        reader, writer = await asyncio.open_connection("127.0.0.1", bound.port)
        writer.write(head(len(BODY)) + BODY[:10])
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def trickle() -> None:
            for byte in BODY[10:200]:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        answer = await read_answer(reader)
        waited = loop.time() - started
        trickling.cancel()
        rest = await closed_by_server(reader, timeout_s=2)  # no lingering for the rest
        writer.close()

    assert answer.status == 408
    assert answer.error() == "body_timeout: the body did not arrive within 0.5 s"
    assert answer.headers["connection"].lower() == "close"
    assert 0.4 < waited < 3
    assert rest == b""
    assert queued(redis_db) == 0


async def test_a_slow_request_head_is_cut_off_and_a_prompt_one_is_served(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    async with listening(make_settings(header_timeout_s=0.5), "127.0.0.1", 0) as bound:
        reader, writer = await asyncio.open_connection("127.0.0.1", bound.port)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def trickle() -> None:
            # A byte every 0.1 s: activity, but the head never completes in time.
            for byte in head(len(BODY)):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)

        trickling = asyncio.create_task(trickle())
        answered = await closed_by_server(reader, timeout_s=10)
        cut_after = loop.time() - started
        trickling.cancel()
        writer.close()

        prompt = await exchange(bound.port, head(len(BODY)) + BODY)

    assert answered == b""
    assert 0.4 < cut_after < 3
    assert prompt.status == 202
    assert queued(redis_db) == 1


async def test_a_head_over_the_limit_is_431_json_and_nothing_is_queued(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    settings = make_settings(max_header_bytes=2048)
    padding = [f"X-Pad-{n}: {'p' * 200}" for n in range(12)]  # each line fine, together 2.5 KB
    async with listening(settings, "127.0.0.1", 0) as bound:
        refused = await exchange(bound.port, head(len(BODY), *padding) + BODY)
        within = await exchange(bound.port, head(len(BODY), *padding[:4]) + BODY)

    assert refused.status == 431
    assert refused.error() == "headers_too_large: the request head exceeds 2048 bytes"
    assert within.status == 202
    assert queued(redis_db) == 1


async def test_a_too_long_line_or_too_many_headers_is_a_json_400_quoting_nothing(
    make_settings: Callable[..., Settings], redis_db: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp's parser refuses these itself, before any middleware; IngressRunner makes the
    # answer our JSON error, without the line aiohttp would quote.
    settings = make_settings(max_header_bytes=2048, max_headers=16)
    leaked = "sec-LEAK-" + "z" * 3000
    many = [f"X-N-{n}: 1" for n in range(20)]
    async with listening(settings, "127.0.0.1", 0) as bound:
        with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
            long_line = await exchange(bound.port, head(len(BODY), f"X-Secret: {leaked}") + BODY)
            too_many = await exchange(bound.port, head(len(BODY), *many) + BODY)

    assert (long_line.status, too_many.status) == (400, 400)
    for answer in (long_line, too_many):
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.error().startswith("Bad Request: the request could not be parsed")
    assert b"sec-LEAK" not in long_line.body
    assert queued(redis_db) == 0
    # The log line about it names the refusal, not the bytes (which could be a secret).
    logged = "\n".join(r.getMessage() + str(r.exc_info) + str(r.exc_text) for r in caplog.records)
    assert "LineTooLong" in logged
    assert "sec-LEAK" not in logged


async def test_over_the_concurrency_limit_is_503_with_retry_after(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    async with listening(make_settings(max_concurrent=1), "127.0.0.1", 0) as bound:
        # The first request holds the only slot while its body is on its way.
        reader, writer = await asyncio.open_connection("127.0.0.1", bound.port)
        writer.write(head(len(BODY)) + BODY[:100])
        await writer.drain()
        await asyncio.sleep(0.2)  # the first request reaches its handler; no event to wait on

        second = await exchange(bound.port, head(len(BODY)) + BODY)
        writer.write(BODY[100:])
        first = await read_answer(reader)
        writer.close()
        third = await exchange(bound.port, head(len(BODY)) + BODY)

    assert second.status == 503
    assert second.headers["retry-after"] == "1"
    assert second.error().startswith("overloaded: 1 requests are in progress")
    assert first.status == 202
    assert third.status == 200  # the slot is free again; same bytes: a duplicate
    assert queued(redis_db) == 1


def nested(depth: int) -> bytes:
    """An envelope whose objects and arrays nest ``depth`` deep, the envelope included."""
    inner = b"1"
    for n in range(depth - 2):
        inner = b'{"k": ' + inner + b"}" if n % 2 else b"[" + inner + b"]"
    return b'{"type": "customer.created", "data": ' + inner.replace(b"1", b"{}", 1) + b"}"


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (nested(32), 202, None),
        (nested(33), 422, "json_too_deep: objects and arrays nest deeper than 32"),
        (b"[" * 5000 + b"]" * 5000, 422, "json_too_deep"),  # beyond orjson's own 1024
        (b'{"type": "customer.created", "data": {"n": 18446744073709551615}}', 202, None),
        (b'{"type": "customer.created", "data": {"n": -9223372036854775808}}', 202, None),
        # Beyond 64 bits: orjson reads a float; accepted, the body is kept as sent (rule 1).
        (b'{"type": "customer.created", "data": {"n": 18446744073709551616}}', 202, None),
        (b'{"type": "customer.created", "data": {"n": ' + b"9" * 300 + b"}}", 202, None),
        # Beyond a double: nobody can read it.
        (b'{"type": "customer.created", "data": {"n": ' + b"9" * 5000 + b"}}", 422, "number_out"),
        (b'{"type": "customer.created", "data": {"n": 1e400}}', 422, "number_out_of_range"),
        (b'{"type": "customer.created", "data": {"n": -1e400}}', 422, "number_out_of_range"),
        (b'{"type": "customer.created", "data": {"n": 12345678901234567890.5}}', 202, None),
        (b'{"type": "customer.created", "data": {"n": 1e-400}}', 202, None),
    ],
)
async def test_json_depth_and_numbers_beyond_a_double_are_a_clear_422_never_a_500(
    make_settings: Callable[..., Settings],
    redis_db: redis.Redis,
    body: bytes,
    status: int,
    expected: str | None,
) -> None:
    async with listening(make_settings(), "127.0.0.1", 0) as bound:
        answer = await exchange(bound.port, head(len(body)) + body)

    assert answer.status == status, answer.body
    if expected is not None:
        assert answer.error().startswith(expected)
        assert queued(redis_db) == 0
    else:
        assert queued(redis_db) == 1


async def test_a_body_larger_than_the_limit_is_413_even_when_chunked(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    big = orjson.dumps({"type": "customer.created", "data": {"pad": "x" * 5000}})
    chunked = (
        b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (big[:3000], big[3000:])) + b"0\r\n\r\n"
    )
    async with listening(make_settings(max_body_bytes=4096), "127.0.0.1", 0) as bound:
        declared = await exchange(bound.port, head(len(big)) + big)
        streamed = await exchange(
            bound.port, head(None, "Transfer-Encoding: chunked", auth=SECRET) + chunked
        )

    assert declared.error().startswith("body_too_large")
    assert (declared.status, streamed.status) == (413, 413)
    assert queued(redis_db) == 0


async def test_a_content_type_that_is_not_utf8_is_named_escaped_not_a_500(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    request = head(5).replace(b"Content-Type: application/json", b"Content-Type: text/\xff\xfe")
    async with listening(make_settings(), "127.0.0.1", 0) as bound:
        answer = await exchange(bound.port, request + b"a=b&c")

    assert answer.status == 415
    assert answer.error() == "unsupported_media_type: expected a JSON body, got text/\\udcff\\udcfe"
