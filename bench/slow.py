"""A local HTTP server that answers every request after 50 ms: the outside system of the I/O
handler benchmarks. Run: ``python -m bench.slow PORT``.

On a 2-core machine this server's own CPU competes with the workers under test, so it is an
asyncio Protocol on uvloop rather than an aiohttp app (whose request objects, router and
middleware cost several times more per request): it parses just enough of HTTP/1.1 to be correct
for aiohttp's and httpx's clients. Connections are kept alive; requests pipelined on one
connection are answered in the order they came, each 50 ms after it arrived; a request body
(``Content-Length``) is read and ignored; ``Connection: close`` and HTTP/1.0 close after the
answer; a chunked body or an oversized head gets an error and the connection is closed.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import cast

import uvloop

DELAY_S = 0.05
MAX_HEAD_BYTES = 65_536

_BODY = b"ok"
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
_KEEP = _OK + b"\r\n" + _BODY
_CLOSE = _OK + b"Connection: close\r\n\r\n" + _BODY
# By (HEAD request, close after it).
_RESPONSES = {
    (False, False): _KEEP,
    (False, True): _CLOSE,
    (True, False): _OK + b"\r\n",
    (True, True): _OK + b"Connection: close\r\n\r\n",
}


def _refusal(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class SlowProtocol(asyncio.Protocol):
    """One connection: requests parsed as they arrive, each answered ``DELAY_S`` later.

    Every request schedules one timer, and every timer writes the *oldest* unanswered response:
    with equal delays the n-th timer to fire belongs to the n-th request anyway, and this way
    pipelined answers can never leave out of order, whatever the timer heap does with ties.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # uvloop's transports are not subclasses of asyncio.Transport, hence the cast.
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._body_left = 0  # bytes of the current request's body still to skip
        self._pending: deque[tuple[bytes, bool]] = deque()  # (response, close after it)
        self._closing = False  # a request asked to close: read nothing after it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        buffer = self._buffer + data if self._buffer else data
        while buffer:
            if self._body_left:
                skipped = min(self._body_left, len(buffer))
                self._body_left -= skipped
                buffer = buffer[skipped:]
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    self._refuse(b"431 Request Header Fields Too Large")
                    return
                break
            head = buffer[:end].lower()
            buffer = buffer[end + 4 :]
            if not self._request(head):
                return
        self._buffer = buffer

    def _request(self, head: bytes) -> bool:
        """Queue the answer to one request whose head (lower-cased) is ``head``; False when the
        connection is being closed and nothing more is to be read."""
        line_end = head.find(b"\r\n")
        request_line = head if line_end < 0 else head[:line_end]
        if b"\r\ntransfer-encoding:" in head:
            self._refuse(b"501 Not Implemented")
            return False
        if (at := head.find(b"\r\ncontent-length:")) >= 0:
            value_end = head.find(b"\r\n", at + 17)
            try:
                self._body_left = int(head[at + 17 : value_end if value_end >= 0 else None])
            except ValueError:
                self._refuse(b"400 Bad Request")
                return False
        if request_line.endswith(b"http/1.0"):
            close = b"\r\nconnection: keep-alive" not in head
        else:
            close = b"\r\nconnection: close" in head
        self._pending.append((_RESPONSES[request_line.startswith(b"head "), close], close))
        self._loop.call_later(DELAY_S, self._answer)
        if close:
            self._closing = True
            return False
        return True

    def _answer(self) -> None:
        if self._transport is None or not self._pending:
            return
        response, close = self._pending.popleft()
        self._transport.write(response)
        if close:
            self._transport.close()

    def _refuse(self, status: bytes) -> None:
        # Whatever was pipelined before the bad request is still answered first.
        self._closing = True
        self._pending.append((_refusal(status), True))
        self._loop.call_later(DELAY_S, self._answer)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SlowProtocol(loop), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
