"""Annotated field types that accept what Calenso's PHP backend really sends.

Calenso encodes booleans as ``0``/``1``, ids and prices as numbers or strings, empty values as
``null`` or ``""``, and timestamps without a zone. Each type below turns those into one Python
type and rejects anything else with a message that never quotes the input (it may be personal).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import AwareDatetime, BeforeValidator, NaiveDatetime, ValidationInfo
from pydantic_core import PydanticCustomError

CREATED_TZ = "created_tz"
"""Key of the validation context entry that holds the zone of a naive ``created``."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_INT = re.compile(r"[+-]?\d+")
# A time part follows the date after "T" or a space; without it the value is a bare date.
_HAS_TIME = re.compile(r"\d[Tt ]\d")
_SWISS_DATE = re.compile(r"(\d{1,2})\.(\d{1,2})\.(\d{4})")
# MySQL's "zero date", which PHP backends emit for "no value".
_ZERO_DATE = "0000-00-00"


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# The hot validators (str, int, bool: most fields of every event) test exact types first and
# inline _blank: each is called once per field per parse, and a call costs as much as the test.


def _to_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if not word:
            return None
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    elif isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise PydanticCustomError("bool_parsing", "Input should be a boolean, 0/1 or true/false")


def _to_int(value: Any) -> int | None:
    if type(value) is int or value is None:
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if _INT.fullmatch(text):
            return int(text)
        number = _decimal_or_none(text)
        if number is not None and number == number.to_integral_value():
            return int(number)
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(value, float) and value.is_integer():
        return int(value)
    raise PydanticCustomError("int_parsing", "Input should be an integer or a numeric string")


def _decimal_or_none(text: str) -> Decimal | None:
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _to_decimal(value: Any) -> Decimal | None:
    if _blank(value):
        return None
    number: Decimal | None = None
    if isinstance(value, Decimal):
        number = value if value.is_finite() else None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, float):
        # repr() is the shortest round-tripping text, so 120.1 becomes 120.1, not 120.0999…
        number = _decimal_or_none(repr(value))
    elif isinstance(value, str):
        number = _decimal_or_none(value.strip())
    if number is None:
        raise PydanticCustomError("decimal_parsing", "Input should be a number or a numeric string")
    return number


def _to_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if value is None:
        return None
    # Zip codes and the like sometimes arrive as JSON numbers.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise PydanticCustomError("string_type", "Input should be a string")


def _parse_timestamp(value: Any) -> datetime | None:
    """Parse a timestamp; ``None`` for blank or zero-date values."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("datetime_type", "Input should be a timestamp string")
    text = value.strip()
    if not text or text.startswith(_ZERO_DATE):
        return None
    if not _has_time(text):
        raise PydanticCustomError(
            "datetime_parsing", "Input should be a date with a time, e.g. 2025-03-20 14:00:00"
        )
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise PydanticCustomError(
            "datetime_parsing",
            "Input should be a timestamp like 2025-03-20 14:00:00 or ISO-8601",
        ) from None


def _has_time(text: str) -> bool:
    # Calenso's own format (2025-03-20 14:00:00) is recognised without the regex.
    if len(text) > 11 and text[10] in "Tt " and "0" <= text[9] <= "9" and "0" <= text[11] <= "9":
        return True
    return _HAS_TIME.search(text) is not None


def _with_zone(moment: datetime, zone: tzinfo | None) -> datetime:
    """``moment.replace(tzinfo=zone)``, which costs twice the constructor for a plain datetime."""
    if type(moment) is not datetime:
        return moment.replace(tzinfo=zone)
    return datetime(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
        zone,
        fold=moment.fold,
    )


def _to_utc(value: Any) -> datetime | None:
    """``*_utc`` fields are UTC by definition: a naive value is read as UTC."""
    moment = _parse_timestamp(value)
    if moment is None:
        return None
    if moment.tzinfo is None:
        return _with_zone(moment, UTC)
    return _in_utc(moment)


def _in_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a time that UTC cannot hold (year 1 east of it, 9999 west of it) is a
    validation error, not an OverflowError escaping the parse."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "datetime_range", "Input should be a timestamp in range"
        ) from None


def _to_local(value: Any) -> datetime | None:
    """Store-local wall-clock time: an offset, if one is sent, is dropped, the clock time kept."""
    moment = _parse_timestamp(value)
    if moment is None:
        return None
    return _with_zone(moment, None)


def _to_created(value: Any, info: ValidationInfo) -> datetime:
    moment = _parse_timestamp(value)
    if moment is None:
        raise PydanticCustomError("datetime_parsing", "Input should be a timestamp, not empty")
    if moment.tzinfo is None:
        moment = _with_zone(moment, _created_tz(info))
    return _in_utc(moment)


def _created_tz(info: ValidationInfo) -> tzinfo:
    context = info.context
    zone = context.get(CREATED_TZ) if isinstance(context, dict) else None
    return zone if isinstance(zone, tzinfo) else UTC


def _to_date(value: Any) -> date | None:
    if value is None or _blank(value):
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(_ZERO_DATE):
            return None
        swiss = _SWISS_DATE.fullmatch(text)
        try:
            if swiss:
                day, month, year = (int(part) for part in swiss.groups())
                return date(year, month, day)
            if _HAS_TIME.search(text):
                return datetime.fromisoformat(text).date()
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise PydanticCustomError("date_parsing", "Input should be a date like 1990-05-17")


OptStr = Annotated[str | None, BeforeValidator(_to_str)]
"""A string kept as given; ``null``, ``""`` and whitespace become ``None``; ints become text."""

OptBool = Annotated[bool | None, BeforeValidator(_to_bool)]
"""``true``/``false``, ``0``/``1``, ``"0"``/``"1"``, ``"true"``/``"false"``; blank is ``None``."""

OptInt = Annotated[int | None, BeforeValidator(_to_int)]
"""An integer, a numeric string (``"42"``) or an integral float (``42.0``); blank is ``None``."""

OptDecimal = Annotated[Decimal | None, BeforeValidator(_to_decimal)]
"""A money amount from a number or a string, as an exact ``Decimal``; blank is ``None``."""

OptUtcDatetime = Annotated[AwareDatetime | None, BeforeValidator(_to_utc)]
"""An aware UTC datetime; naive input is UTC. Blank or ``0000-00-00 …`` is ``None``."""

OptLocalDatetime = Annotated[NaiveDatetime | None, BeforeValidator(_to_local)]
"""A naive store-local wall-clock datetime."""

CreatedDatetime = Annotated[AwareDatetime, BeforeValidator(_to_created)]
"""The envelope's ``created`` in UTC; naive input is in the zone given by the caller."""

OptDate = Annotated[date | None, BeforeValidator(_to_date)]
"""A date (``1990-05-17``, ``17.05.1990`` or a timestamp's date part); blank is ``None``."""
