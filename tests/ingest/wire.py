"""Raw HTTP/1.1 over a real socket, for tests that need control of every byte and its timing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from tests.conftest import SECRET


@dataclass(frozen=True)
class Answer:
    """A response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        """``code: detail`` of a JSON error body."""
        payload = orjson.loads(self.body)
        assert payload["status"] == "error", payload
        return f"{payload['error']}: {payload['detail']}"


def head(
    body_length: int | None,
    *extra: str,
    path: str = "/webhooks/calenso",
    auth: str | None = SECRET,
) -> bytes:
    """A POST request head with the test secret (unless ``auth`` is None) and ``extra`` lines."""
    lines = [f"POST {path} HTTP/1.1", "Host: calhook.test", "Content-Type: application/json"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if body_length is not None:
        lines.append(f"Content-Length: {body_length}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = 10.0) -> Answer:
    """One response: status line, headers, and a Content-Length body."""
    async with asyncio.timeout(timeout_s):
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def exchange(port: int, request: bytes) -> Answer:
    """Send ``request`` on a new connection and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the server still sends before it closes the connection (within the time)."""
    async with asyncio.timeout(timeout_s):
        return await reader.read()
