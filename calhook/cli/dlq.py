"""``calhook dlq …``: dead letters, the (event, handler) pairs whose handler failed for good."""

from __future__ import annotations

import json

import click

from calhook.cli._common import broker_client, first, select, when
from calhook.cli._records import purge, replay


@click.group()
def dlq() -> None:
    """Dead letters: (event, handler) pairs whose handler failed for good."""


@dlq.command("list")
@click.option("--handler", default=None, help="Only this handler's.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def dlq_list(handler: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, oldest first (without their bodies: `dlq show` has them)."""
    from calhook.store.records import DEAD, RecordStore

    store = RecordStore(broker_client(), DEAD)
    matches = (lambda r: r.get("handler") == handler) if handler else None
    listed = first(store.records(with_body=False), matches, limit)
    if as_json:
        click.echo(json.dumps({"count": store.count(), "records": listed}, indent=2))
        return
    click.echo(f"{store.count()} dead letters")
    for record in listed:
        click.echo(
            f"{record['id']}  {record.get('reason', ''):<10} attempts={record.get('attempts', '?')}"
            f"  {when(record.get('failed_at'))}  {record.get('error', '')[:80]}"
        )


@dlq.command("show")
@click.argument("record_id")
def dlq_show(record_id: str) -> None:
    """Show one dead letter: error, traceback summary, attempts and the event's body."""
    from calhook.store.records import DEAD, RecordStore

    record = RecordStore(broker_client(), DEAD).get(record_id)
    if record is None:
        raise click.ClickException(f"no dead letter {record_id}")
    click.echo(json.dumps(record, indent=2))


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every dead letter.")
@click.option("--handler", default=None, help="Every dead letter of this handler.")
def dlq_replay(ids: tuple[str, ...], select_all: bool, handler: str | None) -> None:
    """Run only the failed handler again for each selected event (attempt 1)."""
    from calhook.store.records import DEAD, RecordStore

    store = RecordStore(broker_client(), DEAD)
    matches = (lambda r: r.get("handler") == handler) if handler else None
    replay(DEAD, select(store.records(), ids, select_all, matches), show_queue=True)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every dead letter.")
@click.option("--handler", default=None, help="Every dead letter of this handler.")
def dlq_purge(ids: tuple[str, ...], select_all: bool, handler: str | None) -> None:
    """Delete dead letters for good."""
    from calhook.store.records import DEAD, RecordStore

    store = RecordStore(broker_client(), DEAD)
    matches = (lambda r: r.get("handler") == handler) if handler else None
    purge(DEAD, select(store.records(), ids, select_all, matches))
