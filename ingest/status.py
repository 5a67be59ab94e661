"""``GET /status``: a read-only page for people, behind the admin token (``ingest/admin.py``).

The queue table of ``calhook queues``, handler outcome counts, and the latest dead letters and
parked events, refreshing itself every few seconds. Its Redis reads are synchronous code shared
with the CLI, so they run in a thread: the event loop that answers Calenso never waits for them.
It shows ids, types, reasons and error classes, never payloads or error texts (which can hold
personal data): those stay behind ``calhook dlq show``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
from typing import Any

import redis
from aiohttp import web

from calhook.store.queues import HEAD, QueueRow, queue_table, render_table
from calhook.store.records import DEAD, PARKED, RecordStore
from calhook.store.stats import outcomes, recent_failures

REFRESH_S = 5
_LATEST = 20


def _latest(client: redis.Redis, kind: str) -> list[dict[str, str]]:
    store = RecordStore(client, kind)
    total = store.count()
    ids = store.ids(limit=_LATEST, offset=max(total - _LATEST, 0))
    records = [store.get(i) for i in reversed(ids)]
    return [r for r in records if r is not None]


def snapshot(client: redis.Redis, queues: set[str]) -> dict[str, Any]:
    """Everything the page shows, read from Redis (blocking: run it in a thread)."""
    return {
        "queues": queue_table(client, queues),
        "outcomes": sorted(outcomes(client)),
        "failures": recent_failures(client, _LATEST),
        "dead": _latest(client, DEAD),
        "parked": _latest(client, PARKED),
    }


def _when(epoch: str | None) -> str:
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _rows(cells: list[list[str]]) -> str:
    return "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in cells)  # fmt: skip


def render(data: dict[str, Any]) -> str:
    """The page."""
    queues: list[QueueRow] = data["queues"]
    head = list(HEAD)
    table = render_table(queues).splitlines()[1:]
    queue_rows = [line.split() for line in table]
    outcome_rows = [[h, o, str(n)] for h, o, n in data["outcomes"]]
    dead_rows = [
        [r.get("id", ""), r.get("handler", ""), r.get("reason", ""),
         r.get("error", "").split(":", 1)[0], r.get("attempts", ""), _when(r.get("failed_at"))]
        for r in data["dead"]
    ]  # fmt: skip
    failure_rows = [
        [f["event_id"], f["handler"], str(f["attempt"]), f["outcome"], f["error"],
         _when(str(f["at"]))]
        for f in data["failures"]
    ]  # fmt: skip
    parked_rows = [[r.get("id", ""), r.get("type", ""), r.get("reason", ""),
                    _when(r.get("parked_at"))] for r in data["parked"]]  # fmt: skip
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    def section(title: str, columns: list[str], rows: list[list[str]], empty: str) -> str:
        if not rows:
            return f"<h2>{title}</h2><p class=empty>{empty}</p>"
        header = "".join(f"<th>{c}</th>" for c in columns)
        return f"<h2>{title}</h2><table><tr>{header}</tr>{_rows(rows)}</table>"

    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>calhook status</title>
<meta http-equiv=refresh content={REFRESH_S}>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; font-family: monospace; }}
.empty {{ color: #777; }} small {{ color: #777; }}
</style></head><body>
<h1>calhook</h1><small>{now}, refreshing every {REFRESH_S} s; read-only</small>
{section("Queues", head, queue_rows, "no queue known yet")}
{section("Handler outcomes", ["handler", "outcome", "count"], outcome_rows, "no handler ran yet")}
{section("Latest failures", ["event", "handler", "attempt", "outcome", "error", "when"],
         failure_rows, "none")}
{section("Latest dead letters", ["id", "handler", "reason", "error", "attempts", "failed"],
         dead_rows, "none")}
{section("Latest parked events", ["event", "type", "reason", "parked"], parked_rows, "none")}
<p><small>Details and replay: <code>calhook dlq show ID</code>, <code>calhook parked show ID</code>,
<code>calhook events show EVENT_ID</code>.</small></p>
</body></html>
"""  # fmt: skip


async def page(request: web.Request, client: redis.Redis, queues: set[str]) -> web.Response:
    """Render the page from a snapshot taken in a thread."""
    data = await asyncio.to_thread(snapshot, client, queues)
    return web.Response(text=render(data), content_type="text/html")
