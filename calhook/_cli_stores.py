"""``calhook dlq …`` and ``calhook parked …``: read, replay and purge what needs people."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Iterable

import click
import redis

from calhook.settings import SettingsError, get_settings
from calhook.store.pairs import PairState


def _client() -> redis.Redis:
    from workers.connections import redis_client

    try:
        get_settings().require_redis_url()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    return redis_client()


def _when(epoch: str | None) -> str:
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _select(
    records: Iterable[dict[str, str]],
    ids: tuple[str, ...],
    select_all: bool,
    matches: Callable[[dict[str, str]], bool] | None,
) -> list[str]:
    if not ids and not select_all and matches is None:
        raise click.UsageError("name records by ID, or select them with --all or a filter")
    if ids:
        return list(ids)
    return [r["id"] for r in records if matches is None or matches(r)]


@click.group()
def dlq() -> None:
    """Dead letters: (event, handler) pairs whose handler failed for good."""


@dlq.command("list")
@click.option("--handler", default=None, help="Only this handler's.")
@click.option("--limit", type=int, default=50, show_default=True)
def dlq_list(handler: str | None, limit: int) -> None:
    """List dead letters, oldest first."""
    from calhook.store.records import DEAD, RecordStore

    store = RecordStore(_client(), DEAD)
    click.echo(f"{store.count()} dead letters")
    shown = 0
    for record in store.records():
        if handler and record.get("handler") != handler:
            continue
        click.echo(
            f"{record['id']}  {record.get('reason', ''):<10} attempts={record.get('attempts', '?')}"
            f"  {_when(record.get('failed_at'))}  {record.get('error', '')[:80]}"
        )
        shown += 1
        if shown >= limit:
            break


@dlq.command("show")
@click.argument("record_id")
def dlq_show(record_id: str) -> None:
    """Show one dead letter: error, traceback summary, attempts and the event's body."""
    from calhook.store.records import DEAD, RecordStore

    record = RecordStore(_client(), DEAD).get(record_id)
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

    store = RecordStore(_client(), DEAD)
    matches = (lambda r: r.get("handler") == handler) if handler else None
    _replay(DEAD, _select(store.records(), ids, select_all, matches), show_queue=True)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every dead letter.")
@click.option("--handler", default=None, help="Every dead letter of this handler.")
def dlq_purge(ids: tuple[str, ...], select_all: bool, handler: str | None) -> None:
    """Delete dead letters for good."""
    from calhook.store.records import DEAD, RecordStore

    store = RecordStore(_client(), DEAD)
    matches = (lambda r: r.get("handler") == handler) if handler else None
    _purge(DEAD, _select(store.records(), ids, select_all, matches))


def _replay(kind: str, selected: list[str], *, show_queue: bool = False) -> None:
    """Replay each record: one transition each, so a record replayed by someone else at the
    same time is reported and not run twice."""
    from calhook.store.connect import pair_store
    from calhook.store.pairs import ReplayError

    pairs = pair_store(_client(), get_settings())
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


def _purge(kind: str, selected: list[str]) -> None:
    from calhook.store.connect import pair_store

    pairs = pair_store(_client(), get_settings())
    purged = sum(pairs.purge(kind, selected[i : i + 500]) for i in range(0, len(selected), 500))
    click.echo(f"{purged} purged")


@click.group()
def parked() -> None:
    """Events dispatch could not route (unknown type, schema failure, no handler)."""


@parked.command("list")
@click.option("--reason", default=None, help="Only events parked for this reason.")
@click.option("--limit", type=int, default=50, show_default=True)
def parked_list(reason: str | None, limit: int) -> None:
    """List parked events, oldest first."""
    from calhook.store.records import PARKED, RecordStore

    store = RecordStore(_client(), PARKED)
    click.echo(f"{store.count()} parked")
    shown = 0
    for record in store.records():
        if reason and record.get("reason") != reason:
            continue
        click.echo(
            f"{record['id']}  {record.get('type', '')[:40]:<40} {record.get('reason', '')}"
            f"  {_when(record.get('parked_at'))}"
        )
        shown += 1
        if shown >= limit:
            break


@parked.command("show")
@click.argument("event_id")
def parked_show(event_id: str) -> None:
    """Show one parked event, with its reason, errors and body."""
    from calhook.store.records import PARKED, RecordStore

    record = RecordStore(_client(), PARKED).get(event_id)
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

    store = RecordStore(_client(), PARKED)
    _replay(PARKED, _select(store.records(), ids, select_all, _filter(reason, event_type)))


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

    store = RecordStore(_client(), PARKED)
    _purge(PARKED, _select(store.records(), ids, select_all, _filter(reason, event_type)))


def _filter(reason: str | None, event_type: str | None) -> Callable[[dict[str, str]], bool] | None:
    if reason is None and event_type is None:
        return None
    return lambda r: (
        (reason is None or r.get("reason") == reason)
        and (event_type is None or r.get("type") == event_type)
    )


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
    from workers.registry import load_modules, registry

    client = _client()
    load_modules(get_settings().handler_modules)
    names = {h.queue for h in registry}
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


@click.group()
def events() -> None:
    """The story of each event: received, dispatched or parked, every handler attempt."""


def _since(value: str) -> float:
    """``30m``, ``2h``, ``7d`` ago, or an ISO time, as epoch seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    if value and value[-1] in units and value[:-1].isdigit():
        return time.time() - int(value[:-1]) * units[value[-1]]
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use 30m, 2h, 7d or an ISO time") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _stamp(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@events.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="The entries as JSON.")
def events_show(event_id: str, as_json: bool) -> None:
    """What happened to one event, oldest first, and where each handler stands now."""
    from calhook.store.connect import pair_store
    from calhook.store.trail import Trail

    client = _client()
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


@events.command("list")
@click.option("--type", "event_type", default=None, help="Only events of this type.")
@click.option("--since", default="24h", show_default=True, help="30m, 2h, 7d or an ISO time.")
@click.option("--limit", type=int, default=50, show_default=True)
def events_list(event_type: str | None, since: str, limit: int) -> None:
    """Events that arrived since a time, newest first."""
    from calhook.store.trail import Trail

    trail = Trail(_client(), get_settings().trail_keep_s)
    for entry in trail.events(since=_since(since), event_type=event_type, limit=limit):
        click.echo(f"{entry['event_id']}  {_stamp(entry['at'])}  {entry.get('type', '')}"
                   f"  {entry.get('endpoint', '')}")  # fmt: skip
