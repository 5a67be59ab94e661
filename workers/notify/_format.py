"""Dates and amounts as a notice shows them, per language, without depending on the OS locale."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo

Language = Literal["de", "en"]

_MONTHS_EN = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def store_time(utc: datetime | None, local: datetime | None, zone: ZoneInfo) -> datetime | None:
    """The instant in the store's zone; Calenso's own wall-clock time when there is no UTC."""
    if utc is not None:
        return utc.astimezone(zone)
    return local


def format_datetime(value: datetime, language: Language) -> str:
    """``20.03.2025 14:00`` in German, ``20 March 2025, 14:00`` in English."""
    if language == "de":
        return value.strftime("%d.%m.%Y %H:%M")
    return f"{value.day} {_MONTHS_EN[value.month - 1]} {value.year}, {value:%H:%M}"


def format_time(value: datetime) -> str:
    """``14:45``: the same in both languages."""
    return value.strftime("%H:%M")


def format_amount(amount: Decimal | None, currency: str | None) -> str | None:
    """``120.00 CHF``; ``None`` without an amount."""
    if amount is None:
        return None
    return f"{amount:.2f} {currency}".strip() if currency else f"{amount:.2f}"
