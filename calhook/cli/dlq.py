"""``calhook dlq …``: dead letters, the (event, handler) pairs whose handler failed for good."""

from __future__ import annotations

import click

from calhook.cli._common import when
from calhook.cli._records import Kind, record_group


@click.group()
def dlq() -> None:
    """Dead letters: (event, handler) pairs whose handler failed for good."""


record_group(
    Kind(
        key="dead",
        noun="dead letter",
        plural="dead letters",
        replay_help="Run only the failed handler again for each selected event (attempt 1).",
        line=lambda r: (
            f"{r['id']}  {r.get('reason', ''):<10} attempts={r.get('attempts', '?')}"
            f"  {when(r.get('failed_at'))}  {r.get('error', '')[:80]}"
        ),
    ),
    dlq,
)
