"""``calhook handlers …``: hold a handler while its destination is down, and let it go again.

A paused handler's events are held, not run: no attempt is spent and nothing is dead-lettered
(:mod:`calhook.store.health`). Resuming hands them to the scheduler, which queues them oldest
first at a pace. ``list`` shows what is held, by whom and since when, and the breakers that are
open.

The helpers at the bottom (``who``, ``age``, ``table``) are shared with ``calhook failures``.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import re
import time
from collections.abc import Sequence

import click
import redis

from calhook.cli._common import broker_client, cli_settings
from calhook.store.connect import pair_store
from calhook.store.health import OPERATOR, Breaker, Health, HealthError, Hold
from calhook.store.keys import STATS_OUTCOMES, duration_key

# What a handler's name may be: what people type, and what ends up in Redis keys and labels.
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(?:/s)?$")


@click.group(invoke_without_command=True)
@click.pass_context
def handlers(ctx: click.Context) -> None:
    """The fleet's routes (alone: `calhook handlers routes`), and handlers held while their
    destination is down (paused by an operator or by their circuit's breaker)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(routes_)


@handlers.command("routes")
@click.option("--json", "as_json", is_flag=True, help="The workers' entries and the problems.")
@click.option("--check", is_flag=True, help="Exit 1 when there is a problem (for CI, probes).")
def routes_(as_json: bool, check: bool) -> None:
    """Type → handler → queue → the workers that run it, as the workers published it, and what
    would park or strand events: a handler no dispatching worker knows, a queue nobody
    consumes, workers that disagree about a handler."""
    from workers import routes

    workers = routes.read(broker_client())
    found = routes.problems(workers)
    if as_json:
        click.echo(json.dumps({"workers": workers, "problems": found}, indent=2))
    elif not workers:
        click.echo("no worker has published its routes (none is running, or none since the "
                   "upgrade)")  # fmt: skip
    else:
        rows = [
            [r.event_type, r.handler, r.queue, ", ".join(r.served_by) or "NOBODY"]
            for r in routes.routes(workers)
        ]
        click.echo(table(["type", "handler", "queue", "run by"], rows))
        click.echo("")
        # A handler some other worker runs but this one does not (unconfigured or off here).
        running = {h["name"] for w in workers for h in w["handlers"]}
        for w in workers:
            inactive = ", ".join(f"{n} ({why})" for n, why in w["inactive"].items() if n in running)
            click.echo(f"{w['worker']}: queues {', '.join(w['queues'])}"
                       + (f"; not run here: {inactive}" if inactive else ""))  # fmt: skip
        click.echo("")
        if found:
            click.echo(f"{len(found)} problem{'s' if len(found) != 1 else ''}:")
            for line in found:
                click.echo(f"- {line}")
        else:
            click.echo("no problem: every handler is known to the dispatch and has a consumer")
    if check and found:
        raise SystemExit(1)


def health() -> Health:
    """The store's holds, breakers and failure groups, on the broker."""
    return Health(pair_store(broker_client(), cli_settings()).scripts)


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not NAME.match(value):
        raise click.BadParameter(
            f"{value!r}: a handler's name is 1-100 of A-Z a-z 0-9 _ . -", ctx, param
        )
    return value


def _rate(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    found = _RATE.match(value.strip())
    if found is None or float(found.group(1)) <= 0:
        raise click.BadParameter(f"{value!r}: events a second, e.g. 20/s or 0.5/s", ctx, param)
    return float(found.group(1))


# Who acts, for the notices and ``list``; the OS user name unless told.
by_option = click.option("--by", default=None, help="Who acts [your user name, or operator].")


@handlers.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def list_(as_json: bool) -> None:
    """Handlers held or releasing their held events, and open breakers."""
    store = health()
    holds, breakers = store.holds(), store.breakers()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "holds": [_hold_json(h) for h in holds],
                    "breakers": [dataclasses.asdict(b) for b in breakers],
                },
                indent=2,
            )
        )
        return
    now = time.time()
    if holds:
        click.echo(
            table(
                ["handler", "by", "reason", "since", "held", "oldest"],
                [_hold_row(h, now) for h in holds],
            )
        )
    else:
        click.echo("no handler is held")
    if breakers:
        click.echo()
        click.echo(
            table(
                ["circuit", "state", "failures", "error", "next probe", "probes", "handlers"],
                [_breaker_row(b, now) for b in breakers],
            )
        )
    else:
        click.echo("no breaker is open")


def _hold_json(hold: Hold) -> dict[str, object]:
    return {**dataclasses.asdict(hold), "releasing": not hold.paused}


def _hold_row(hold: Hold, now: float) -> list[str]:
    if not hold.paused:
        by, reason, since = "-", "(resumed; releasing)", "-"
    else:
        # A breaker's circuit is named when it is not the handler itself (a shared destination).
        by = hold.by if hold.circuit in ("", hold.handler) else f"breaker:{hold.circuit}"
        reason = hold.reason or "-"
        since = age(None if hold.since is None else now - hold.since)
    oldest = age(None if hold.oldest_at is None else now - hold.oldest_at)
    return [hold.handler, by, reason, since, str(hold.held), oldest]


def _breaker_row(breaker: Breaker, now: float) -> list[str]:
    if breaker.state == "half_open":
        probe = "probing"
    else:
        probe = age(None if breaker.probe_at is None else max(breaker.probe_at - now, 0.0))
    return [
        breaker.circuit,
        breaker.state,
        str(breaker.failures),
        breaker.error or "-",
        probe,
        str(breaker.probes),
        ",".join(breaker.handlers) or "-",
    ]


@handlers.command("pause")
@click.argument("name", callback=_name)
@click.option("--reason", default="", help="Why, for the others (list and the notices show it).")
@by_option
def pause(name: str, reason: str, by: str | None) -> None:
    """Hold NAME: its events wait, unrun, until `calhook handlers resume NAME`."""
    store = health()
    if not ever_ran(store.client, name):
        click.echo(
            f"warning: no worker ever recorded a handler named {name} (a typo?); pausing it anyway",
            err=True,
        )
    who_ = by or who()
    before = store.pause(name, reason=reason, by=who_)
    because = f": {reason}" if reason else ""
    click.echo(
        f"paused {name} (by {who_}{because}); its events are held until "
        f"`calhook handlers resume {name}`"
    )
    if before.startswith("breaker:"):
        click.echo(
            f"(its breaker, circuit {before.removeprefix('breaker:')}, held it already; "
            "now it stays held until resumed)"
        )
    elif before:
        click.echo("(it was paused already: reason and name updated)")


@handlers.command("resume")
@click.argument("name", callback=_name)
@click.option(
    "--rate",
    default=None,
    callback=_rate,
    metavar="N/s",
    help="Release the held events at N a second [CALHOOK_RELEASE_RATE_PER_S].",
)
@by_option
def resume(name: str, rate: float | None, by: str | None) -> None:
    """Let NAME run again; the scheduler releases its held events, oldest first, at a pace."""
    store = health()
    # A resume closes the breaker of its circuit: the circuit's other handlers run again too.
    closing = [b for b in store.breakers() if name in b.handlers]
    try:
        held = store.resume(name, by=by or who(), rate_per_s=rate)
    except HealthError as exc:
        raise click.ClickException(str(exc)) from None
    if held == 0:
        click.echo(f"resumed {name}: no held events to release")
    else:
        pace = rate if rate is not None else cli_settings().release_rate_per_s
        click.echo(
            f"resumed {name}: {held} held events will be released, oldest first, at "
            f"{pace:g}/s (about {age(held / pace)}) by the scheduler"
        )
    for breaker in closing:
        others = [h for h in breaker.handlers if h != name]
        if others:
            click.echo(
                f"its breaker (circuit {breaker.circuit}) is closed: {', '.join(others)} "
                f"run again too, their held events released at their own pace"
            )


def ever_ran(client: redis.Redis, name: str) -> bool:
    """Whether some worker recorded an attempt of handler ``name`` (its duration or outcome)."""
    if client.exists(duration_key(name)):
        return True
    # NAME's characters are none of the glob's (* ? [ ] \): the pattern matches it literally.
    return any(True for _ in client.hscan_iter(STATS_OUTCOMES, match=f"{name}\t*", count=1000))


def who() -> str:
    """Who is typing: the OS user name, else ``operator`` (a container may have none)."""
    try:
        return getpass.getuser() or OPERATOR
    except (OSError, KeyError):
        return OPERATOR


def age(seconds: float | None) -> str:
    """A duration as people read it at a glance: ``42s``, ``12m``, ``3.5h``, ``2.1d``; ``-``
    for none (the queue table's ``oldest`` column, with days)."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86_400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86_400:.1f}d"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A text table, as ``calhook queues`` lays one out: the first column to the left, counts
    and ages to the right, text columns to the left."""
    widths = [max(len(c) for c in column) for column in zip(head, *rows, strict=True)]
    numeric = [
        all(c == "-" or c[:1].isdigit() for c in column) for column in zip(*rows, strict=True)
    ] or [False] * len(head)
    out = []
    for line in (head, *rows):
        cells = [
            c.rjust(w) if i and numeric[i] else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
