"""Replay and purge of dead letters and parked events, shared by ``dlq`` and ``parked``."""

from __future__ import annotations

import click

from calhook.cli._common import broker_client
from calhook.settings import get_settings


def replay(kind: str, selected: list[str], *, show_queue: bool = False) -> None:
    """Replay each record: one transition each, so a record replayed by someone else at the
    same time is reported and not run twice."""
    from calhook.store.connect import pair_store
    from calhook.store.pairs import ReplayError

    pairs = pair_store(broker_client(), get_settings())
    done = 0
    for record_id in selected:
        try:
            queue = pairs.replay(kind, record_id)
        except ReplayError as exc:
            click.echo(f"{record_id}: {exc}", err=True)
            continue
        if show_queue:
            click.echo(f"{record_id}: queued on {queue}")
        done += 1
    click.echo(f"{done} replayed")


def purge(kind: str, selected: list[str]) -> None:
    from calhook.store.connect import pair_store

    pairs = pair_store(broker_client(), get_settings())
    purged = sum(pairs.purge(kind, selected[i : i + 500]) for i in range(0, len(selected), 500))
    click.echo(f"{purged} purged")
