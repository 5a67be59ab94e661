"""``calhook events …``: the story of each event."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
from collections.abc import Iterator
from typing import Any

import click
import redis

from calhook.cli._common import broker_client, parse_time
from calhook.settings import get_settings
from calhook.store.pairs import PairState


@click.group()
def events() -> None:
    """The story of each event: received, dispatched or parked, every handler attempt."""


def _stamp(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@events.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="The entries as JSON.")
def events_show(event_id: str, as_json: bool) -> None:
    """What happened to one event, oldest first, and where each handler stands now."""
    from calhook.store.connect import pair_store
    from calhook.store.trail import Trail

    client = broker_client()
    # Entries come from several processes (a spooled event's ingress, workers): order by time.
    entries = sorted(
        Trail(client, get_settings().trail_keep_s).read(event_id), key=lambda e: e["at"]
    )
    if not entries:
        raise click.ClickException(
            f"no trail for {event_id} (unknown, not dispatched yet, or expired)"
        )
    states = pair_store(client, get_settings()).states(event_id)
    now = {p.pair.replace("@", ""): _state(p) for p in states.values()}
    if as_json:
        pairs = {name: dataclasses.asdict(p) for name, p in states.items()}
        click.echo(json.dumps({"event_id": event_id, "entries": entries, "states": now,
                               "pairs": pairs}, indent=2))  # fmt: skip
        return
    for entry in entries:
        details = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("at", "what"))
        click.echo(f"{_stamp(entry['at'])}  {entry['what']:<10} {details}")
    click.echo("now: " + (", ".join(f"{h}={s}" for h, s in sorted(now.items())) or "-"))


def _state(pair: PairState) -> str:
    """A pair's state as people read it: ``waiting (attempt 3, due 12:00:05)``."""
    if pair.state == "waiting" and pair.due_s is not None:
        return f"waiting (attempt {pair.attempt}, due {_stamp(pair.due_s)})"
    if pair.state in ("running", "queued") and pair.attempt > 1:
        return f"{pair.state} (attempt {pair.attempt})"
    return pair.state


_STATES = ("queued", "running", "waiting", "held", "done", "stale", "dead", "parked")


@events.command("list")
@click.option("--type", "event_type", default=None, help="Only events of this type.")
@click.option("--since", default="24h", show_default=True, help="30m, 2h, 7d or an ISO time.")
@click.option("--until", default=None, help="30m, 2h, 7d or an ISO time (default: now).")
@click.option("--handler", default=None, help="Only events routed to this handler.")
@click.option(
    "--state",
    type=click.Choice(_STATES),
    default=None,
    help="Only events whose pair of --handler is in this state (held, dead …).",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def events_list(
    event_type: str | None,
    since: str,
    until: str | None,
    handler: str | None,
    state: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Events that arrived between two times, newest first; with --handler, where its pair of
    each stands."""
    from calhook.store.trail import Trail

    if state is not None and handler is None:
        raise click.UsageError("--state needs --handler")
    client = broker_client()
    trail = Trail(client, get_settings().trail_keep_s)
    found = trail.events(
        since=parse_time(since),
        until=None if until is None else parse_time(until),
        event_type=event_type,
        limit=limit if handler is None else 1 << 62,
    )
    entries = list(found) if handler is None else _with_pair(client, found, handler, state, limit)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    for entry in entries:
        pair = f"  {handler}={entry['state']}" if handler is not None else ""
        click.echo(f"{entry['event_id']}  {_stamp(entry['at'])}  {entry.get('type', '')}"
                   f"  {entry.get('endpoint', '')}{pair}")  # fmt: skip


def _with_pair(
    client: redis.Redis,
    entries: Iterator[dict[str, Any]],
    handler: str,
    state: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The entries of events with a pair of ``handler`` (in ``state``), each with its state;
    read 200 at a time."""
    from calhook.store.keys import event_key

    out: list[dict[str, Any]] = []
    while len(out) < limit:
        chunk = list(itertools.islice(entries, 200))
        if not chunk:
            break
        with client.pipeline(transaction=False) as pipe:
            for entry in chunk:
                pipe.hget(event_key(entry["event_id"]), f"{handler}/s")
            states = pipe.execute()
        for entry, raw in zip(chunk, states, strict=True):
            if raw is not None and (state is None or raw.decode() == state):
                out.append({**entry, "state": raw.decode()})
                if len(out) >= limit:
                    break
    return out
