"""``calhook failures …``: failure groups, one per (handler, error class, reason).

Every failure of a handler joins its group (:mod:`calhook.store.health`): how many, first and
last seen, a few sample events and the latest error text scrubbed of personal data. A group of
transient failures closes by itself at the handler's next success; an operator acknowledges one
(it stays, without new notices) or resolves it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import click

from calhook.cli._common import when
from calhook.cli.handlers import age, by_option, health, table, who
from calhook.store.health import GROUP_STATES, FailureGroup, Health, HealthError

# A group's id: the first 12 hex digits of a SHA-1 (lua/_lib.lua group_failure).
GROUP_ID = re.compile(r"^[0-9a-f]{12}$")
_LIVE = ("open", "acknowledged")
_MESSAGE_WIDTH = 60


class _ListByDefault(click.Group):
    """``calhook failures`` alone, or with list's options, is ``calhook failures list``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ListByDefault)
def failures() -> None:
    """Failure groups: a handler's failures by error class and reason (list by default)."""


def _group_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not GROUP_ID.match(value):
        raise click.BadParameter(f"{value!r}: a group's id is 12 hex digits", ctx, param)
    return value


@failures.command("list")
@click.option("--all", "every", is_flag=True, help="Closed and resolved groups too.")
@click.option("--handler", default=None, help="Only this handler's.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def list_(every: bool, handler: str | None, limit: int, as_json: bool) -> None:
    """Open and acknowledged groups (--all: every one kept), the most recently seen first."""
    states = GROUP_STATES if every else _LIVE
    found = [
        g
        for g in health().groups(states, limit=sys.maxsize)
        if handler is None or g.handler == handler
    ]
    listed = found[:limit]
    if as_json:
        click.echo(
            json.dumps({"count": len(found), "groups": [g.as_json() for g in listed]}, indent=2)
        )
        return
    which = "kept" if every else "open or acknowledged"
    click.echo(f"{len(found)} failure group{'' if len(found) == 1 else 's'} {which}")
    if not listed:
        return
    now = time.time()
    head = [
        "id",
        "handler",
        "error",
        "reason",
        "state",
        "count",
        "first seen",
        "last seen",
        "message",
    ]
    click.echo(table(head, [_row(g, now) for g in listed]))


def _row(group: FailureGroup, now: float) -> list[str]:
    message = group.message.replace("\n", " ")
    if len(message) > _MESSAGE_WIDTH:
        message = message[: _MESSAGE_WIDTH - 1] + "…"
    return [
        group.id,
        group.handler,
        group.error or "-",
        group.reason,
        group.state,
        str(group.count),
        age(now - group.first),
        age(now - group.last),
        message or "-",
    ]


@failures.command("show")
@click.argument("group_id", callback=_group_id)
@click.option("--json", "as_json", is_flag=True, help="The group as JSON, for scripts.")
def show(group_id: str, as_json: bool) -> None:
    """Everything about one group: counts, times, sample events, the latest message."""
    group = _get(group_id, health())
    if as_json:
        click.echo(json.dumps(group.as_json(), indent=2))
        return
    now = time.time()
    fields: list[tuple[str, Any]] = [
        ("id", group.id),
        ("handler", group.handler),
        ("error", group.error or "-"),
        ("reason", group.reason),
        ("state", group.state),
        ("count", group.count),
        ("first", f"{when(str(group.first))} UTC ({age(now - group.first)} ago)"),
        ("last", f"{when(str(group.last))} UTC ({age(now - group.last)} ago)"),
    ]
    if group.ended is not None:
        fields.append(("ended", f"{when(str(group.ended))} UTC by {group.by or '-'}"))
    fields.append(("samples", " ".join(group.samples) or "-"))
    fields.append(("message", group.message or "-"))
    for name, value in fields:
        click.echo(f"{name:<8} {value}")
    if group.samples:
        click.echo(f"story:   calhook events show {group.samples[-1]}")
    if group.reason != "transient":
        # Transient failures are still being retried; the others wait as dead letters.
        error = f" --error {group.error}" if group.error else ""
        click.echo(
            f"replay:  calhook dlq replay --handler {group.handler} --reason {group.reason}"
            f"{error} --dry-run"
        )


@failures.command("acknowledge")
@click.argument("group_id", callback=_group_id)
@by_option
def acknowledge(group_id: str, by: str | None) -> None:
    """Say someone is on it: the group stays open, without new notices."""
    who_, store = by or who(), health()
    try:
        store.acknowledge(group_id, by=who_)
    except HealthError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"acknowledged {_label(_get(group_id, store))} by {who_}")


@failures.command("resolve")
@click.argument("group_id", callback=_group_id)
@by_option
def resolve(group_id: str, by: str | None) -> None:
    """End the group: the next failure of its kind opens it anew."""
    who_, store = by or who(), health()
    try:
        store.resolve(group_id, by=who_)
    except HealthError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"resolved {_label(_get(group_id, store))} by {who_}")


def _get(group_id: str, store: Health) -> FailureGroup:
    try:
        return store.group(group_id)
    except HealthError as exc:
        raise click.ClickException(str(exc)) from None


def _label(group: FailureGroup) -> str:
    return f"{group.id} ({group.handler}: {group.error or '-'}, {group.reason}, {group.count}x)"
