"""``calhook parked …``: events dispatch could not route."""

from __future__ import annotations

import click

from calhook.cli._common import when
from calhook.cli._records import Kind, record_group


@click.group()
def parked() -> None:
    """Events dispatch could not route (unknown type, schema failure, no handler)."""


record_group(
    Kind(
        key="parked",
        noun="parked event",
        plural="parked",
        replay_help="Dispatch the selected events again (e.g. after a handler for their type "
        "was deployed).",
        line=lambda r: (
            f"{r['id']}  {r.get('type', '')[:40]:<40} {r.get('reason', '')}"
            f"  {when(r.get('parked_at'))}"
        ),
    ),
    parked,
)
