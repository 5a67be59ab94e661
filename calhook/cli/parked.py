"""``calhook parked …``: events dispatch could not route."""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from calhook.cli._common import broker_client, first, select, when
from calhook.cli._records import purge, replay


@click.group()
def parked() -> None:
    """Events dispatch could not route (unknown type, schema failure, no handler)."""


@parked.command("list")
@click.option("--reason", default=None, help="Only events parked for this reason.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def parked_list(reason: str | None, limit: int, as_json: bool) -> None:
    """List parked events, oldest first (without their bodies: `parked show` has them)."""
    from calhook.store.records import PARKED, RecordStore

    store = RecordStore(broker_client(), PARKED)
    listed = first(store.records(with_body=False), _filter(reason, None), limit)
    if as_json:
        click.echo(json.dumps({"count": store.count(), "records": listed}, indent=2))
        return
    click.echo(f"{store.count()} parked")
    for record in listed:
        click.echo(
            f"{record['id']}  {record.get('type', '')[:40]:<40} {record.get('reason', '')}"
            f"  {when(record.get('parked_at'))}"
        )


@parked.command("show")
@click.argument("event_id")
def parked_show(event_id: str) -> None:
    """Show one parked event, with its reason, errors and body."""
    from calhook.store.records import PARKED, RecordStore

    record = RecordStore(broker_client(), PARKED).get(event_id)
    if record is None:
        raise click.ClickException(f"no parked event {event_id}")
    click.echo(json.dumps(record, indent=2))


@parked.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every parked event.")
@click.option("--reason", default=None, help="Every event parked for this reason.")
@click.option("--type", "event_type", default=None, help="Every parked event of this type.")
def parked_replay(
    ids: tuple[str, ...], select_all: bool, reason: str | None, event_type: str | None
) -> None:
    """Dispatch the selected events again (e.g. after a handler for their type was deployed)."""
    from calhook.store.records import PARKED, RecordStore

    store = RecordStore(broker_client(), PARKED)
    replay(PARKED, select(store.records(), ids, select_all, _filter(reason, event_type)))


@parked.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every parked event.")
@click.option("--reason", default=None, help="Every event parked for this reason.")
@click.option("--type", "event_type", default=None, help="Every parked event of this type.")
def parked_purge(
    ids: tuple[str, ...], select_all: bool, reason: str | None, event_type: str | None
) -> None:
    """Delete parked events for good."""
    from calhook.store.records import PARKED, RecordStore

    store = RecordStore(broker_client(), PARKED)
    purge(PARKED, select(store.records(), ids, select_all, _filter(reason, event_type)))


def _filter(reason: str | None, event_type: str | None) -> Callable[[dict[str, str]], bool] | None:
    if reason is None and event_type is None:
        return None
    return lambda r: (
        (reason is None or r.get("reason") == reason)
        and (event_type is None or r.get("type") == event_type)
    )
