"""What every command shares: settings that fail as a one-line message, the broker client,
the time format, and the choice of records by id, ``--all`` or a filter."""

from __future__ import annotations

import datetime as dt
import time
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


def first(
    records: Iterable[dict[str, str]],
    matches: Callable[[dict[str, str]], bool] | None,
    limit: int,
) -> list[dict[str, str]]:
    """The first ``limit`` of ``records`` that ``matches`` (all of them without a filter)."""
    return list(islice((r for r in records if matches is None or matches(r)), limit))


def parse_time(value: str) -> float:
    """``30m``, ``2h``, ``7d`` ago, or an ISO time (UTC unless it says), as epoch seconds; the
    one time syntax of every command."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    if value and value[-1] in units and value[:-1].isdigit():
        return time.time() - int(value[:-1]) * units[value[-1]]
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use 30m, 2h, 7d or an ISO time") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
