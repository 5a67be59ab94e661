"""``calhook queues``: the queue view, once or refreshed in place."""

from __future__ import annotations

import datetime as dt
import json
import time

import click

from calhook.cli._common import broker_client
from calhook.settings import get_settings


@click.command()
@click.option(
    "--watch",
    "watch_s",
    type=float,
    default=None,
    is_flag=False,
    flag_value=2.0,
    help="Refresh in place every N seconds (default 2) until Ctrl-C.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue, for scripts.")
def queues(watch_s: float | None, as_json: bool) -> None:
    """Per queue, in pairs: ready, running, unacked, delayed, dead, parked, oldest, done/min.

    Reads Redis only; works with no worker running.
    """  # fmt: skip
    from calhook.store.queues import queue_table, render_table
    from workers.registry import load_handlers

    client = broker_client()
    # Every queue a handler may use, configured here or not (this reads, runs nothing).
    registry = load_handlers(get_settings(), tolerant=True)
    names = {h.queue for h in registry} | {h.queue for h, _ in registry.inactive.values()}
    while True:
        rows = queue_table(client, names)
        if as_json:
            text = json.dumps([row.as_json() for row in rows], indent=2)
        else:
            text = render_table(rows)
        if watch_s is None:
            click.echo(text)
            return
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        click.echo(f"\x1b[H\x1b[2J{text}\n\n{stamp}, every {watch_s:g}s; Ctrl-C to stop", nl=False)
        try:
            time.sleep(watch_s)
        except KeyboardInterrupt:
            click.echo()
            return
