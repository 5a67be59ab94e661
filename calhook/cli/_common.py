"""What every command shares: settings that fail as a one-line message, the broker client,
the time format, and the choice of records by id, ``--all`` or a filter."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from itertools import islice

import click
import redis

from calhook import logs
from calhook.settings import Settings, SettingsError, get_settings


def broker_settings() -> Settings:
    """The settings of a long-running process on the broker: logging set up, REDIS_URL required."""
    settings = cli_settings()
    logs.configure(settings.log_format, settings.log_level)
    try:
        settings.require_redis_url()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    return settings


def cli_settings() -> Settings:
    """The settings, or a one-line error naming the bad variable."""
    try:
        return get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def broker_client() -> redis.Redis:
    """The broker client of this process (through Sentinel if REDIS_URL names it)."""
    from workers.connections import redis_client

    try:
        get_settings().require_redis_url()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    return redis_client()


def when(epoch: str | None) -> str:
    """An epoch as UTC ``YYYY-MM-DD HH:MM:SS``; ``-`` for none."""
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def select(
    records: Iterable[dict[str, str]],
    ids: tuple[str, ...],
    select_all: bool,
    matches: Callable[[dict[str, str]], bool] | None,
) -> list[str]:
    """The ids named, or those of ``records`` that ``matches`` (all with ``--all``)."""
    if not ids and not select_all and matches is None:
        raise click.UsageError("name records by ID, or select them with --all or a filter")
    if ids:
        return list(ids)
    return [r["id"] for r in records if matches is None or matches(r)]


def first(
    records: Iterable[dict[str, str]],
    matches: Callable[[dict[str, str]], bool] | None,
    limit: int,
) -> list[dict[str, str]]:
    """The first ``limit`` of ``records`` that ``matches`` (all of them without a filter)."""
    return list(islice((r for r in records if matches is None or matches(r)), limit))
