"""The faster envelope check, shape label, lenient validators and parse_event change no result.

Each is compared with a verbatim copy of the code it replaced (the ``_was_*`` functions below),
on fixtures and on generated input: the same value (by ``repr``, so a zone, a ``fold`` or a NaN
counts), or the same error with the same details.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from enum import IntEnum
from types import MappingProxyType
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    NaiveDatetime,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from schemas import Envelope, EnvelopeError, SchemaError, parse_envelope, parse_event
from schemas._flat import resolve as resolve_reference
from schemas._lenient import (
    _FALSE,
    _HAS_TIME,
    _INT,
    _SWISS_DATE,
    _TRUE,
    _ZERO_DATE,
    CREATED_TZ,
    CreatedDatetime,
    OptBool,
    OptDate,
    OptInt,
    OptLocalDatetime,
    OptStr,
    OptUtcDatetime,
    _blank,
    _created_tz,
    _decimal_or_none,
)
from schemas.catalogue import family_of
from schemas.envelope import (
    _ABSENT,
    _check_data,
    _check_type,
    _error,
    _text,
    json_type_name,
)
from schemas.errors import strip_validation_errors, summarise
from schemas.events import MODEL_BY_FAMILY, CalensoEvent, Shape, UnknownEvent
from schemas.parse import detect_shape
from tests.schemas._support import fixture_names, flatten, load
from tests.security._strategies import budget, json_values, near_valid_envelopes

ZURICH = ZoneInfo("Europe/Zurich")
ZONES: list[tzinfo] = [UTC, ZURICH, timezone(timedelta(hours=5, minutes=30))]

# --- the code before (copied verbatim, names prefixed) ------------------------------------------


def _was_to_bool(value: Any) -> bool | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise PydanticCustomError("bool_parsing", "Input should be a boolean, 0/1 or true/false")


def _was_to_int(value: Any) -> int | None:
    if _blank(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if _INT.fullmatch(text):
            return int(text)
        number = _decimal_or_none(text)
        if number is not None and number == number.to_integral_value():
            return int(number)
    raise PydanticCustomError("int_parsing", "Input should be an integer or a numeric string")


def _was_to_str(value: Any) -> str | None:
    if _blank(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise PydanticCustomError("string_type", "Input should be a string")


def _was_parse_timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("datetime_type", "Input should be a timestamp string")
    text = value.strip()
    if not text or text.startswith(_ZERO_DATE):
        return None
    if not _HAS_TIME.search(text):
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


def _was_to_utc(value: Any) -> datetime | None:
    moment = _was_parse_timestamp(value)
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _was_to_local(value: Any) -> datetime | None:
    moment = _was_parse_timestamp(value)
    if moment is None:
        return None
    return moment.replace(tzinfo=None)


def _was_to_created(value: Any, info: ValidationInfo) -> datetime:
    moment = _was_parse_timestamp(value)
    if moment is None:
        raise PydanticCustomError("datetime_parsing", "Input should be a timestamp, not empty")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_created_tz(info))
    return moment.astimezone(UTC)


def _was_to_date(value: Any) -> date | None:
    if _blank(value):
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


def _was_parse_envelope(body: object) -> Envelope:
    if not isinstance(body, Mapping):
        problem = f"the body must be a JSON object, got {json_type_name(body)}"
        raise EnvelopeError(problem, [_error("", problem, "dict_type")])
    event_type = body.get("type", _ABSENT)
    data = body.get("data", _ABSENT)
    errors = [e for e in (_check_type(event_type), _check_data(data)) if e is not None]
    if errors:
        raise EnvelopeError("; ".join(e["msg"] for e in errors), errors)
    assert isinstance(event_type, str)
    assert isinstance(data, Mapping)
    return Envelope.model_construct(
        type=event_type,
        created=_text(body.get("created")),
        source=_text(body.get("source")),
        data=data if isinstance(data, dict) else dict(data),
    )


def _was_detect_shape(data: Mapping[str, Any]) -> Shape:
    for value in data.values():
        if isinstance(value, Mapping):
            return "nested"
        if isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
            return "nested"
    return "flat"


def _was_parse_event(envelope: Any, *, created_tz: tzinfo = UTC) -> CalensoEvent:
    if not isinstance(envelope, Envelope):
        envelope = _was_parse_envelope(envelope)
    family = family_of(envelope.type)
    model = MODEL_BY_FAMILY[family] if family is not None else UnknownEvent
    fields: dict[str, Any] = {
        "type": envelope.type,
        "family": family,
        "source": envelope.source,
        "shape": _was_detect_shape(envelope.data),
        "raw_data": envelope.data,
    }
    if envelope.created is not None:
        fields["created"] = envelope.created
    fields.update(resolve_reference(model, envelope.data))
    try:
        return model.model_validate(fields, context={CREATED_TZ: created_tz})
    except ValidationError as exc:
        errors = strip_validation_errors(exc)
    label = family.value if family is not None else "unknown"
    raise SchemaError(f"invalid {label} event: {summarise(errors)}", errors)


# --- outcomes -------------------------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> tuple[str, ...]:
    """What a call gives, comparable across implementations: its value or its error."""
    try:
        value = call()
    except ValidationError as exc:
        return ("invalid", repr(exc.errors(include_url=False)))
    except SchemaError as exc:
        # The old parse_event is a copy outside the package; compare message and details.
        return ("schema error", str(exc), repr(exc.errors))
    except Exception as exc:  # e.g. OverflowError: year 1 moved to UTC from a zone east of it
        return ("raised", type(exc).__name__, str(exc))
    if isinstance(value, BaseModel):
        extra = repr(getattr(value, "raw_data", None))
        return (type(value).__name__, repr(value), extra, repr(value.model_fields_set))
    return (type(value).__name__, repr(value))


def _adapters(new: Any, old_type: Any, old: Callable[..., Any]) -> tuple[TypeAdapter[Any], ...]:
    return TypeAdapter(new), TypeAdapter(Annotated[old_type, BeforeValidator(old)])


VALIDATORS = {
    "bool": _adapters(OptBool, bool | None, _was_to_bool),
    "int": _adapters(OptInt, int | None, _was_to_int),
    "str": _adapters(OptStr, str | None, _was_to_str),
    "date": _adapters(OptDate, date | None, _was_to_date),
    "utc": _adapters(OptUtcDatetime, AwareDatetime | None, _was_to_utc),
    "local": _adapters(OptLocalDatetime, NaiveDatetime | None, _was_to_local),
    "created": _adapters(CreatedDatetime, AwareDatetime, _was_to_created),
}


class _Moment(datetime):
    """A datetime subclass: the constructor shortcut must not apply to it."""


class _Text(str):
    """A str subclass, as a caller (not JSON) might pass."""


class _Number(IntEnum):
    ONE = 1


timestamps = st.sampled_from(
    [
        "2025-03-14 09:12:47",
        "2025-03-14T09:12:47Z",
        "2025-03-14t09:12",
        " 2025-03-14 09:12:47+01:00 ",
        "2025-03-14 09:12:47.123456-03:30",
        "2025-03-30 02:30:00",
        "2025-10-26 02:30:00",
        "2025-03-14",
        "2025-03-14 9:12",
        "2025-03-14 ",
        "2025-3-14 09:12:47",
        "20250314T091247",
        "0000-00-00 00:00:00",
        "0000-00-00",
        "17.05.1990",
        "1.5.1990",
        "31.02.1990",
        "٢٠٢٥-٠٣-١٤ ٠٩:١٢",
        "2025-03-14X09:12",
        "2025-03-14-09:12",
        "2025-03-14_09:12:47",
        "2025-03-1a 09:12",
        "2025-03-14 a9:12",
        "x1 2",
    ]
)
values: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 0.0, 1.0, -0.0, 2.5, Decimal("1"), Decimal("NaN")]),
    st.text(max_size=12),
    st.sampled_from(["", " ", "\t", "0", "1", "true", " Yes ", "off", "42", " -7 ", "4.0", "1e3"]),
    st.sampled_from([_Text("x"), _Text(" "), _Text("1"), _Number.ONE, [], {}, ("t",)]),
    timestamps,
    st.datetimes(timezones=st.none() | st.sampled_from(ZONES), allow_imaginary=True),
    st.datetimes(timezones=st.none() | st.sampled_from(ZONES), allow_imaginary=True).map(
        lambda d: _Moment(*d.timetuple()[:6], d.microsecond, d.tzinfo, fold=d.fold)
    ),
    st.dates(),
)


@budget(local=1500, ci=6000)
@given(st.sampled_from(sorted(VALIDATORS)), values, st.sampled_from(ZONES))
def test_lenient_validators_as_before(kind: str, value: Any, zone: tzinfo) -> None:
    new, old = VALIDATORS[kind]
    context = {CREATED_TZ: zone}
    assert _outcome(lambda: new.validate_python(value, context=context)) == _outcome(
        lambda: old.validate_python(value, context=context)
    )


# --- envelope, shape and the whole parse ----------------------------------------------------


class _Body(Mapping[str, Any]):
    """A Mapping that is not a dict, as a caller might pass."""

    def __init__(self, items: dict[str, Any]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Any:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


ODD_BODIES: list[Any] = [
    _Body({"type": "customer.created", "data": {"customer_uuid": "u"}, "created": 1}),
    {"type": _Text("customer.created"), "data": _Body({"customer_uuid": "u"})},
    {"type": " ", "data": []},
    {"type": None},
    {"data": {}},
    "customer.created",
    [{"type": "customer.created", "data": {}}],
    {"type": "customer.created", "data": {"customer": MappingProxyType({"uuid": "u"})}},
    {"type": "customer.created", "data": {"customer": [MappingProxyType({"uuid": "u"})]}},
    {"type": "customer.created", "data": {"customer": [1, {"uuid": "u"}]}},
]

bodies = st.one_of(
    near_valid_envelopes(),
    st.dictionaries(st.sampled_from(["type", "data", "created", "source", "x"]), json_values),
    st.sampled_from(ODD_BODIES),
)


def _fixture_bodies() -> list[Any]:
    found = []
    for name in fixture_names():
        body = load(name)
        found.append(body)
        found.append({**body, "data": flatten(body["data"], ".")})
    return found


def _compare_parse(body: Any, zone: tzinfo) -> None:
    assert _outcome(lambda: parse_envelope(body)) == _outcome(lambda: _was_parse_envelope(body))
    if isinstance(body, Mapping) and isinstance(body.get("data"), Mapping):
        data = body["data"]
        assert detect_shape(data) == _was_detect_shape(data)
    new = _outcome(lambda: parse_event(body, created_tz=zone))
    assert new == _outcome(lambda: _was_parse_event(body, created_tz=zone))
    try:
        envelope = parse_envelope(body)
    except EnvelopeError:
        return
    assert _outcome(lambda: parse_event(envelope, created_tz=zone)) == new
    if isinstance(body.get("data"), dict):
        assert envelope.data is body["data"]


@pytest.mark.parametrize("body", [*_fixture_bodies(), *ODD_BODIES])
@pytest.mark.parametrize("zone", [UTC, ZURICH])
def test_fixtures_and_odd_bodies_parse_as_before(body: Any, zone: tzinfo) -> None:
    _compare_parse(body, zone)


@budget(local=400, ci=2000)
@given(bodies, st.sampled_from(ZONES))
def test_generated_bodies_parse_as_before(body: Any, zone: tzinfo) -> None:
    _compare_parse(body, zone)
