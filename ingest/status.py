"""``GET /status``: a read-only page for people, behind the admin token (``ingest/admin.py``).

The queue table of ``calhook queues``, held handlers and open breakers, failure groups, handler
outcome counts, and the latest dead letters and parked events, refreshing itself every few
seconds. Its Redis reads are synchronous code shared with the CLI, so they run in a thread: the
event loop that answers Calenso never waits for them. It shows ids, types, reasons and error
classes, never payloads or raw error texts (which can hold personal data): those stay behind
``calhook dlq show``. A failure group's message is the one error text shown, as the worker
scrubbed it (:func:`calhook.privacy.scrub`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import time
from typing import Any

import redis
from aiohttp import web

from calhook.store.health import Breaker, FailureGroup, Health, Hold
from calhook.store.queues import HEAD, QueueRow, queue_table, render_table
from calhook.store.records import DEAD, PARKED, RecordStore
from calhook.store.stats import outcomes, recent_failures

REFRESH_S = 5
_LATEST = 20
_MESSAGE_WIDTH = 120
_GROUP_COLUMNS = [
    "group",
    "handler",
    "error",
    "reason",
    "state",
    "count",
    "first seen",
    "last seen",
    "latest message",
]


def _latest(client: redis.Redis, kind: str) -> list[dict[str, str]]:
    store = RecordStore(client, kind)
    total = store.count()
    ids = store.ids(limit=_LATEST, offset=max(total - _LATEST, 0))
    records = [store.get(i) for i in reversed(ids)]
    return [r for r in records if r is not None]


def snapshot(client: redis.Redis, queues: set[str], health: Health) -> dict[str, Any]:
    """Everything the page shows, read from Redis (blocking: run it in a thread)."""
    return {
        "queues": queue_table(client, queues),
        "holds": health.holds(),
        "breakers": health.breakers(),
        "groups": health.groups(limit=_LATEST),
        "outcomes": sorted(outcomes(client)),
        "failures": recent_failures(client, _LATEST),
        "dead": _latest(client, DEAD),
        "parked": _latest(client, PARKED),
    }


def _when(epoch: str | None) -> str:
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{max(seconds, 0):.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _hold_rows(holds: list[Hold], now: float) -> list[list[str]]:
    rows = []
    for h in holds:
        if h.paused:
            by = h.by if h.circuit in ("", h.handler) else f"breaker:{h.circuit}"
            reason, since = h.reason or "-", _ago(None if h.since is None else now - h.since)
        else:
            by, reason, since = "-", "resumed; releasing", "-"
        oldest = _ago(None if h.oldest_at is None else now - h.oldest_at)
        rows.append([h.handler, by, reason, since, str(h.held), oldest])
    return rows


def _breaker_rows(breakers: list[Breaker], now: float) -> list[list[str]]:
    rows = []
    for b in breakers:
        probe = "probing" if b.state == "half_open" else "-"
        if b.state == "open" and b.probe_at is not None:
            probe = _ago(b.probe_at - now)
        rows.append([b.circuit, b.state, ", ".join(b.handlers), str(b.failures), b.error, probe])
    return rows


def _group_rows(groups: list[FailureGroup]) -> list[list[str]]:
    rows = []
    for g in groups:
        message = g.message
        if len(message) > _MESSAGE_WIDTH:
            message = message[: _MESSAGE_WIDTH - 1] + "…"
        first, last = _when(str(g.first)), _when(str(g.last))
        rows.append(
            [g.id, g.handler, g.error, g.reason, g.state, str(g.count), first, last, message]
        )
    return rows


def _table(columns: list[str], rows: list[list[str]]) -> str:
    header = "".join(f"<th>{c}</th>" for c in columns)
    return f"<table><tr>{header}</tr>{_rows(rows)}</table>"


def _held(holds: list[list[str]], breakers: list[list[str]]) -> str:
    """Held handlers, then open breakers: one section, a calm line when nothing is held."""
    title = "<h2>Held handlers and breakers</h2>"
    if not holds and not breakers:
        return f"{title}<p class=empty>none: every handler runs</p>"
    tables = []
    if holds:
        columns = ["handler", "by", "reason", "since", "held", "oldest"]
        tables.append(_table(columns, holds))
    if breakers:
        columns = ["circuit", "state", "handlers", "failures", "error", "next probe"]
        tables.append(_table(columns, breakers))
    return title + "".join(tables)


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
    at = time.time()
    held = _held(_hold_rows(data["holds"], at), _breaker_rows(data["breakers"], at))
    group_rows = _group_rows(data["groups"])
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    def section(title: str, columns: list[str], rows: list[list[str]], empty: str) -> str:
        if not rows:
            return f"<h2>{title}</h2><p class=empty>{empty}</p>"
        return f"<h2>{title}</h2>{_table(columns, rows)}"

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
{held}
{section("Failure groups", _GROUP_COLUMNS, group_rows, "none open")}
{section("Handler outcomes", ["handler", "outcome", "count"], outcome_rows, "no handler ran yet")}
{section("Latest failures", ["event", "handler", "attempt", "outcome", "error", "when"],
         failure_rows, "none")}
{section("Latest dead letters", ["id", "handler", "reason", "error", "attempts", "failed"],
         dead_rows, "none")}
{section("Latest parked events", ["event", "type", "reason", "parked"], parked_rows, "none")}
<p><small>Details and replay: <code>calhook dlq show ID</code>, <code>calhook parked show ID</code>,
<code>calhook events show EVENT_ID</code>, <code>calhook failures show GROUP</code>;
<code>calhook handlers list</code>, <code>pause</code>, <code>resume</code>.</small></p>
</body></html>
"""  # fmt: skip


async def page(
    request: web.Request, client: redis.Redis, queues: set[str], health: Health
) -> web.Response:
    """Render the page from a snapshot taken in a thread."""
    data = await asyncio.to_thread(snapshot, client, queues, health)
    return web.Response(text=render(data), content_type="text/html")
