"""``calhook serve``: the ingress on its public port and, when configured, the admin listener.

The limits that live below the app are set here, on aiohttp's server:

- ``CALHOOK_HEADER_TIMEOUT_S`` is aiohttp's keep-alive timeout. aiohttp arms it when a
  connection opens and again after each answer, and closes the connection if no complete request
  head has arrived when it fires; so it is also the deadline of a slow head (slowloris), counted
  from the connection or the previous answer, not refreshed by trickled bytes.
- ``CALHOOK_MAX_HEADER_BYTES`` bounds every line (request line and header lines) in aiohttp's
  parser, and the whole head in the app (431); ``CALHOOK_MAX_HEADERS`` bounds their number.
  aiohttp's parser refuses a line or a count beyond them itself, before any calhook code runs,
  with a ``400`` and a closed connection. Its answer would be text quoting the offending line
  (a secret, perhaps): :class:`IngressRunner` makes it our JSON error, quoting nothing, and
  :class:`ParserRefusals` shortens its log line to the refusal's kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler

from calhook.settings import Settings
from ingest.app import create_admin_app, create_app

log = logging.getLogger("calhook.ingest")

#: Requests in flight at shutdown get this long to finish before the publisher is flushed.
SHUTDOWN_TIMEOUT_S = 10.0


class ParserRefusals(logging.Filter):
    """Keep request bytes out of aiohttp's log of a request its parser refused.

    aiohttp logs such a refusal with the exception, whose message quotes up to 100 bytes of the
    offending line: a header value, perhaps a secret. The line keeps only the exception's class.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a parser refusal's record; leave every other record alone."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.msg = "refused a request aiohttp could not parse: %s"
            record.args = (type(exc).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class _JsonRefusals(RequestHandler):
    """aiohttp's protocol, answering what it refuses by itself (a request its parser cannot
    take, a handler that timed out or crashed) with calhook's JSON error, quoting nothing."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own logs the refusal (through ParserRefusals) and checks nothing was sent.
        super().handle_error(request, status, exc, None)
        reason = HTTPStatus(status).phrase if status in _STATUSES else "Error"
        detail = (
            "the request could not be parsed: a line too long, too many headers, or bad framing"
            if status == HTTPStatus.BAD_REQUEST
            else reason
        )
        body = {"status": "error", "error": reason, "detail": detail}
        response = web.Response(
            status=status, body=orjson.dumps(body), content_type="application/json"
        )
        response.force_close()
        return response


_STATUSES = frozenset(s.value for s in HTTPStatus)


class _JsonRefusalsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonRefusals(self, loop=self._loop, **self._kwargs)


class IngressRunner(web.AppRunner):
    """An AppRunner whose connections answer aiohttp's own refusals in JSON (see above).

    aiohttp builds its Server inside ``AppRunner``; its class is swapped for a subclass that
    only changes which protocol class it makes (``Server`` has no slots; nothing else differs).
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        try:
            server.__class__ = _JsonRefusalsServer
        except TypeError:  # an aiohttp whose Server has slots: keep its own (text) refusals
            log.warning("aiohttp's parser refusals stay text/plain with this aiohttp version")
        return server


def _filter_parser_refusals() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ParserRefusals) for f in logger.filters):
        logger.addFilter(ParserRefusals())


def server_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server arguments that enforce the head limits and the head deadline."""
    return {
        "keepalive_timeout": settings.header_timeout_s,
        "max_line_size": settings.max_header_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
    }


@dataclass(frozen=True)
class Listening:
    """The bound ports of a running ingress (useful when asked for port 0)."""

    port: int
    admin_port: int | None


def _port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


@contextlib.asynccontextmanager
async def listening(
    settings: Settings, host: str | None = None, port: int | None = None
) -> AsyncIterator[Listening]:
    """Serve the ingress (and the admin listener) until the block exits, then shut down."""
    _filter_parser_refusals()
    app = create_app(settings)
    options = server_options(settings)
    runner = IngressRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S, **options)
    await runner.setup()
    admin: web.AppRunner | None = None
    try:
        # Several `calhook serve` processes (one per core) share the port.
        site = web.TCPSite(
            runner,
            host or settings.host,
            port if port is not None else settings.port,
            reuse_port=True,
        )
        await site.start()
        admin_port = None
        if settings.admin_port is not None:
            admin = IngressRunner(create_admin_app(app), access_log=None, **options)
            await admin.setup()
            admin_site = web.TCPSite(
                admin, settings.admin_host, settings.admin_port, reuse_port=True
            )
            await admin_site.start()
            admin_port = _port(admin)
        yield Listening(_port(runner), admin_port)
    finally:
        if admin is not None:
            await admin.cleanup()
        await runner.cleanup()


async def _serve_until_signalled(settings: Settings, host: str | None, port: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with listening(settings, host, port) as bound:
        log.info(
            "ingress listening",
            extra={"port": bound.port, "admin_port": bound.admin_port},
        )
        await stop.wait()


def run(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the ingress until SIGTERM or SIGINT; a SettingsError if it cannot start."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve_until_signalled(settings, host, port))
