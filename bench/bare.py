"""The upper bound: an aiohttp handler that reads the body and answers 202, nothing else.

Same server set-up as ``calhook serve`` (uvloop, no access log, SO_REUSEPORT, one process).
Run: ``python -m bench.bare PORT``.
"""

from __future__ import annotations

import sys

from aiohttp import web

from bench.procs import serve

ACCEPTED = b'{"status":"accepted"}'


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=ACCEPTED, content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/webhooks/calenso", accept)
    serve(app, int(sys.argv[1]))


if __name__ == "__main__":
    main()
