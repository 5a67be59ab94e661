"""A local HTTP server that answers every request after 50 ms: the outside system of the I/O
handler benchmark. Run: ``python -m bench.slow PORT``."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

DELAY_S = 0.05


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(DELAY_S)
    return web.Response(text="ok")


def main() -> None:
    app = web.Application()
    app.router.add_get("/", slow)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                backlog=4096)  # fmt: skip


if __name__ == "__main__":
    main()
