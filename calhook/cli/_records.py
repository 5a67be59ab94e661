"""Choosing, replaying and purging dead letters and parked events, shared by ``dlq`` and
``parked``.

Records are chosen by id, by ``--all``, or by a query (``--handler``, ``--type``, ``--reason``,
``--error``, ``--since``/``--until``). A replay or purge can be tried with ``--dry-run`` (how
many, in which groups), runs at ``--rate`` records a second with a progress bar, and can be
stopped with Ctrl-C: each record is one transition, so what is done is gone from the store, and
the same command run again goes on with the rest. Two operators replaying the same records at
once replay each once; the second is told it is gone.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click

from calhook.cli._common import broker_client, first, parse_time
from calhook.settings import get_settings

# The field each kind's records keep the time they were stored in, and their error text in.
_AT = {"dead": "failed_at", "parked": "parked_at"}
_ERROR = {"dead": "error", "parked": "errors"}


@dataclasses.dataclass(frozen=True, slots=True)
class Query:
    """What a record must match; an empty query matches nothing unless ``--all`` is given."""

    kind: str
    handler: str | None = None
    type: str | None = None
    reason: str | None = None
    error: str | None = None
    since: float | None = None
    until: float | None = None

    @property
    def empty(self) -> bool:
        """True when no selector was given."""
        return all(
            v is None
            for v in (self.handler, self.type, self.reason, self.error, self.since, self.until)
        )

    def matches(self, record: dict[str, str]) -> bool:
        """Whether ``record`` is selected (the error matches as a case-insensitive substring)."""
        at = float(record.get(_AT[self.kind]) or 0)
        error = record.get(_ERROR[self.kind], "")
        return (
            (self.handler is None or record.get("handler") == self.handler)
            and (self.type is None or record.get("type") == self.type)
            and (self.reason is None or record.get("reason") == self.reason)
            and (self.error is None or self.error.lower() in error.lower())
            and (self.since is None or at >= self.since)
            and (self.until is None or at < self.until)
        )


def query_options(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The selectors of ``kind``'s commands, as click options."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option("--type", "event_type", default=None, help="Events of this type."),
            click.option("--reason", default=None, help="Records of this reason."),
            click.option(
                "--error", default=None, help="Records whose error contains this (any case)."
            ),
            click.option("--since", default=None, help="Stored since: 30m, 2h, 7d, ISO time."),
            click.option("--until", default=None, help="Stored before: 30m, 2h, 7d, ISO time."),
        ]
        if kind == "dead":
            options.insert(0, click.option("--handler", default=None, help="This handler's."))
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def query(kind: str, **given: Any) -> Query:
    """The query of a command's selector options (their values as click passes them)."""
    return Query(
        kind,
        handler=given.get("handler"),
        type=given.get("event_type"),
        reason=given.get("reason"),
        error=given.get("error"),
        since=parse_time(given["since"]) if given.get("since") else None,
        until=parse_time(given["until"]) if given.get("until") else None,
    )


def chosen(
    records: Iterable[dict[str, str]], ids: tuple[str, ...], select_all: bool, wanted: Query
) -> list[dict[str, str]]:
    """The records named by id, or matching ``wanted`` (every one with ``--all``)."""
    if ids:
        return [{"id": record_id} for record_id in ids]
    if not select_all and wanted.empty:
        raise click.UsageError("name records by ID, or select them with --all or a query")
    return [r for r in records if (select_all and wanted.empty) or wanted.matches(r)]


def groups(kind: str, records: list[dict[str, str]]) -> Counter[tuple[str, ...]]:
    """How many of ``records`` fall in each group: (handler, reason, error class) of a dead
    letter, (type, reason) of a parked event."""
    if kind == "dead":
        return Counter(
            (r.get("handler", "?"), r.get("reason", "?"), r.get("error", "").split(":", 1)[0])
            for r in records
        )
    return Counter((r.get("type", "?"), r.get("reason", "?")) for r in records)


def show_dry_run(kind: str, verb: str, records: list[dict[str, str]]) -> None:
    """What a run would do: how many, and in which groups."""
    click.echo(f"would {verb} {len(records)}")
    for group, n in groups(kind, records).most_common():
        click.echo(f"  {n:>7}  {'  '.join(group)}")


class _Stop:
    """Ctrl-C, taken as a wish: the loop ends after the record in hand, counted."""

    def __init__(self) -> None:
        self.asked = False

    def __call__(self, signum: int, frame: object) -> None:
        self.asked = True


def _paced(items: list[str], rate: float | None, stop: _Stop) -> Iterator[str]:
    began = time.monotonic()
    for n, item in enumerate(items):
        if rate:
            until = began + n / rate
            while not stop.asked and (wait := until - time.monotonic()) > 0:
                time.sleep(min(wait, 0.05))
        if stop.asked:
            return
        yield item


def replay(
    kind: str, selected: list[str], *, rate: float | None = None, show_queue: bool = False
) -> None:
    """Replay each record: one transition each, so a record replayed by someone else at the
    same time is reported and not run twice. Ctrl-C stops after the record in hand, which is
    counted (a KeyboardInterrupt could land between a replay and its count)."""
    from calhook.store.connect import pair_store
    from calhook.store.pairs import ReplayError

    pairs = pair_store(broker_client(), get_settings())
    outcome: Counter[str] = Counter()
    stop = _Stop()
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop)
    try:
        with click.progressbar(
            _paced(selected, rate, stop), length=len(selected), label="replaying",
            file=sys.stderr,
        ) as bar:  # fmt: skip
            for record_id in bar:
                try:
                    queue = pairs.replay(kind, record_id)
                except ReplayError as exc:
                    outcome["failed" if "expired" in str(exc) else "gone"] += 1
                    click.echo(f"\n{record_id}: {exc}", err=True)
                    continue
                outcome["replayed"] += 1
                if show_queue:
                    click.echo(f"{record_id}: queued on {queue}")
    finally:
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)
    if stop.asked:
        left = len(selected) - sum(outcome.values())
        click.echo(f"{_report(outcome, 'replayed')}\nstopped with {left} left: run the same "
                   "command again to go on")  # fmt: skip
        sys.exit(130)
    click.echo(_report(outcome, "replayed"))


def _report(outcome: Counter[str], verb: str) -> str:
    """``N replayed`` first (scripts read that line), then what else happened, a line each."""
    lines = [f"{outcome[verb]} {verb}"]
    if outcome["gone"]:
        lines.append(f"{outcome['gone']} gone already (replayed or purged by someone else)")
    if outcome["failed"]:
        lines.append(f"{outcome['failed']} failed (see above)")
    return "\n".join(lines)


def purge(kind: str, selected: list[str]) -> None:
    """Remove the records, 500 a transition, with a progress bar."""
    from calhook.store.connect import pair_store

    pairs = pair_store(broker_client(), get_settings())
    chunks = [selected[i : i + 500] for i in range(0, len(selected), 500)]
    purged = 0
    with click.progressbar(chunks, label="purging", file=sys.stderr) as bar:
        for chunk in bar:
            purged += pairs.purge(kind, chunk)
    click.echo(f"{purged} purged")


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    """What the commands of one kind of record say and show."""

    key: str  # the store's kind: "dead" or "parked"
    noun: str  # "dead letter"
    plural: str  # "dead letters"
    replay_help: str
    line: Callable[[dict[str, str]], str]


def record_group(kind: Kind, group: click.Group) -> click.Group:
    """Add ``list``, ``show``, ``replay`` and ``purge`` of ``kind`` to ``group``."""

    def store() -> Any:
        from calhook.store.records import RecordStore

        return RecordStore(broker_client(), kind.key)

    @group.command("list")
    @query_options(kind.key)
    @click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
    def list_(limit: int, as_json: bool, **selectors: Any) -> None:
        """List them, oldest first, without their bodies (`show` has them)."""
        records = store()
        wanted = query(kind.key, **selectors)
        listed = first(records.records(with_body=False), wanted.matches, limit)
        if as_json:
            click.echo(json.dumps({"count": records.count(), "records": listed}, indent=2))
            return
        click.echo(f"{records.count()} {kind.plural}")
        for record in listed:
            click.echo(kind.line(record))

    @group.command("show")
    @click.argument("record_id")
    def show(record_id: str) -> None:
        """Show one, with its error and the event's body."""
        record = store().get(record_id)
        if record is None:
            raise click.ClickException(f"no {kind.noun} {record_id}")
        click.echo(json.dumps(record, indent=2))

    @group.command("replay", help=kind.replay_help)
    @click.argument("ids", nargs=-1)
    @click.option("--all", "select_all", is_flag=True, help=f"Every {kind.noun}.")
    @query_options(kind.key)
    @click.option("--dry-run", is_flag=True, help="Say how many and which groups; do nothing.")
    @click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Records a second [as fast as Redis answers].")  # fmt: skip
    def replay_(
        ids: tuple[str, ...], select_all: bool, dry_run: bool, rate: float | None, **selectors: Any
    ) -> None:
        records = store().records(with_body=False)
        picked = chosen(records, ids, select_all, query(kind.key, **selectors))
        if dry_run:
            show_dry_run(kind.key, "replay", picked)
            return
        replay(kind.key, [r["id"] for r in picked], rate=rate, show_queue=kind.key == "dead")

    @group.command("purge")
    @click.argument("ids", nargs=-1)
    @click.option("--all", "select_all", is_flag=True, help=f"Every {kind.noun}.")
    @query_options(kind.key)
    @click.option("--dry-run", is_flag=True, help="Say how many and which groups; do nothing.")
    def purge_(ids: tuple[str, ...], select_all: bool, dry_run: bool, **selectors: Any) -> None:
        """Delete them for good."""
        records = store().records(with_body=False)
        picked = chosen(records, ids, select_all, query(kind.key, **selectors))
        if dry_run:
            show_dry_run(kind.key, "purge", picked)
            return
        purge(kind.key, [r["id"] for r in picked])

    return group
