"""The handlers of the end-to-end benchmark, loaded by the worker as a handler module.

``BENCH_HANDLER=noop``: does nothing but count itself done. ``BENCH_HANDLER=io``: waits on a
local HTTP server that answers after 50 ms (bench/slow.py), as a CRM call would, then counts.
The bare Celery task (bench/bare_celery.py) counts the same way, so both sides pay the same.
"""

from __future__ import annotations

import os

import httpx

from schemas import CURRENT_TYPES
from workers.connections import redis_client
from workers.registry import HandlerContext, handler

DONE_KEY = "bench:done"
MODE = os.environ.get("BENCH_HANDLER", "noop")

if MODE == "noop":

    @handler(*CURRENT_TYPES, queue="bench", name="bench.noop")
    def noop(event: object, ctx: HandlerContext) -> None:
        redis_client().incr(DONE_KEY)

elif MODE == "io":
    _http = httpx.Client(
        timeout=5.0, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512)
    )

    @handler(*CURRENT_TYPES, queue="bench", name="bench.io")
    def wait_on_io(event: object, ctx: HandlerContext) -> None:
        _http.get(os.environ["BENCH_SLOW_URL"]).raise_for_status()
        redis_client().incr(DONE_KEY)
