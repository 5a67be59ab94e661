"""The usual recipe: an aiohttp handler that checks the secret, parses the JSON and calls
Celery's ``send_task`` for each request, as most webhook receivers built on Celery do.

Same server set-up as ``calhook serve``. Run: ``python -m bench.recipe PORT`` with REDIS_URL and
CALHOOK_AUTH_SECRETS set.
"""

from __future__ import annotations

import hmac
import os
import sys

from aiohttp import web
from celery import Celery

from bench.procs import serve

celery = Celery("recipe", broker=os.environ["REDIS_URL"])
SECRET = os.environ["CALHOOK_AUTH_SECRETS"].split(",")[0]


async def accept(request: web.Request) -> web.Response:
    if not hmac.compare_digest(request.headers.get("Authorization", ""), SECRET):
        return web.json_response({"error": "unauthorized"}, status=401)
    payload = await request.json()
    result = celery.send_task("recipe.handle_event", args=[payload], queue="recipe")
    return web.json_response({"status": "accepted", "task_id": result.id}, status=202)


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/webhooks/calenso", accept)
    serve(app, int(sys.argv[1]))


if __name__ == "__main__":
    main()
