"""A time-boxed fuzz of the body parser and the schemas (issue 7), with hypothesis.

Given arbitrary bytes, arbitrary JSON and near-valid Calenso envelopes; when the ingress's JSON
parser (``ingest.body.parse_json``), :func:`schemas.parse_envelope` and :func:`schemas.parse_event`
read them; then they return or raise only their documented errors (the parser an IngestError
whose answer can be written, the schemas EnvelopeError / PayloadError), never pydantic's
ValidationError or anything else, and no error carries an input value. Canonical events of the
valid fixtures, however encoded, dump and validate back to themselves.

Each fuzz target runs rounds of examples until ``CALHOOK_FUZZ_SECONDS`` (default 2 s, 15 s when
CI=true) have passed: each round has a fresh random seed, so a longer budget explores further.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.body import BOM, parse_json
from ingest.errors import IngestError, JsonTooDeep, MalformedJson, NotJson, NumberOutOfRange
from schemas import (
    CalensoEvent,
    EnvelopeError,
    PayloadError,
    SchemaError,
    parse_envelope,
    parse_event,
)
from tests.security._strategies import (
    FIXTURE_BYTES,
    FIXTURES,
    IN_CI,
    UTF8_BOM,
    Draw,
    bodies,
    budget,
    encoded,
    json_values,
    near_valid_envelopes,
)

FUZZ_SECONDS = float(os.environ.get("CALHOOK_FUZZ_SECONDS", "15" if IN_CI else "2"))
EXAMPLES_PER_ROUND = 200
MAX_DEPTH = 32  # CALHOOK_MAX_JSON_DEPTH's default
PARSER_ERRORS = (MalformedJson, NotJson, NumberOutOfRange, JsonTooDeep)


def fuzz(strategy: st.SearchStrategy[Any], check: Callable[[Any], None]) -> int:
    """Run ``check`` over ``strategy`` in rounds until the budget is spent; examples run."""
    runs = 0

    @settings(
        max_examples=EXAMPLES_PER_ROUND,
        deadline=None,
        database=None,
        suppress_health_check=list(budget(1, 1).suppress_health_check),
    )
    @given(strategy)
    def round_(value: Any) -> None:
        nonlocal runs
        runs += 1
        check(value)

    stop = time.monotonic() + FUZZ_SECONDS
    round_()
    while time.monotonic() < stop:
        round_()
    return runs


# --- the JSON parser -------------------------------------------------------------------------

# Content types as aiohttp hands them over: text, and header bytes that are not UTF-8 decoded
# with surrogateescape.
content_types = (
    st.sampled_from(
        ["application/json", "text/json", "application/x+json", "text/plain", "", "multipart/x"]
    )
    | st.text(max_size=30)
    | st.binary(max_size=30).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
)


def check_parser(case: tuple[bytes, str]) -> None:
    body, content_type = case
    refusal: IngestError
    try:
        parse_json(body, content_type, MAX_DEPTH)
        return
    except PARSER_ERRORS as exc:
        refusal = exc
    assert 400 <= refusal.status < 500
    # The error middleware writes exactly this; it must be writable.
    orjson.dumps({"status": "error", "error": refusal.code, "detail": refusal.message})


def test_json_parser_raises_only_its_refusals() -> None:
    runs = fuzz(st.tuples(bodies, content_types), check_parser)
    assert runs >= EXAMPLES_PER_ROUND


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        (b"[" * 40 + b"]" * 40, JsonTooDeep),
        (b"[" * 5000, JsonTooDeep),
        (b'{"n": 1e400}', NumberOutOfRange),
        (b"\xff\xfe{", MalformedJson),
        (UTF8_BOM + b"{", MalformedJson),
    ],
)
def test_json_parser_refusals_are_the_documented_ones(
    body: bytes, refusal: type[IngestError]
) -> None:
    with pytest.raises(refusal):
        parse_json(body, "application/json", MAX_DEPTH)


def test_json_parser_refusal_of_a_non_utf8_content_type_can_be_written() -> None:
    content_type = b"text/\xff".decode("utf-8", "surrogateescape")  # as aiohttp decodes it

    check_parser((b"not json", content_type))


# --- the envelope and the event schemas ------------------------------------------------------

MARKERS = ("Zq7xMarker", "zq7x.marker@example.org", "+41790zq7x", "2025-13-45 zq7x:99")


def without_validation_error(exc: BaseException) -> None:
    """Neither the error nor its cause or context is pydantic's, which quotes input values."""
    seen: BaseException | None = exc
    while seen is not None:
        assert not isinstance(seen, ValidationError), f"a ValidationError behind {exc!r}"
        seen = seen.__cause__ or seen.__context__


def without_markers(exc: SchemaError) -> None:
    text = " ".join([str(exc), repr(exc), json.dumps(exc.errors), *map(str, exc.args)])
    for marker in MARKERS:
        assert marker.lower() not in text.lower(), f"an input value in {exc!r}"


def check_envelope(body: Any) -> None:
    try:
        envelope = parse_envelope(body)
    except EnvelopeError as exc:
        without_validation_error(exc)
        without_markers(exc)
        return
    assert isinstance(body, dict)
    assert envelope.type == body["type"]
    assert envelope.data == body["data"]


def check_event(body: Any) -> None:
    try:
        event = parse_event(body)
    except (EnvelopeError, PayloadError) as exc:
        without_validation_error(exc)
        without_markers(exc)
        return
    assert isinstance(event, CalensoEvent)
    # What a handler gets must survive being passed on (Celery, the trail): dump and read back.
    again = type(event).model_validate_json(event.model_dump_json())
    assert again.model_dump(mode="json") == event.model_dump(mode="json")


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


@st.composite
def marked_envelopes(draw: Draw) -> dict[str, Any]:
    """A fixture with some values (anywhere, ``created`` and ``type`` included) set to markers."""
    body = copy.deepcopy(FIXTURES[draw(st.sampled_from(sorted(FIXTURES)))])
    paths = _leaf_paths(body)
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=6, unique=True)):
        parent: Any = body
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = draw(st.sampled_from(MARKERS))
    return body


anything = st.one_of(
    json_values,
    near_valid_envelopes(),
    marked_envelopes(),
    bodies.map(lambda raw: _decoded(raw)),
)


def _decoded(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def test_parse_envelope_raises_only_envelope_errors() -> None:
    runs = fuzz(anything, check_envelope)
    assert runs >= EXAMPLES_PER_ROUND


def test_parse_event_raises_only_schema_errors() -> None:
    runs = fuzz(anything, check_event)
    assert runs >= EXAMPLES_PER_ROUND


def test_the_checks_find_an_input_value_and_a_validation_error() -> None:
    with pytest.raises(AssertionError, match="an input value"):
        without_markers(PayloadError(f"invalid customer event: email {MARKERS[1]}"))
    wrapped = PayloadError("invalid customer event: customer.email: not an e-mail")
    wrapped.__context__ = ValidationError.from_exception_data("Customer", [])
    with pytest.raises(AssertionError, match="ValidationError"):
        without_validation_error(wrapped)


# --- round trips of the valid fixtures -------------------------------------------------------


@st.composite
def re_encoded(draw: Draw) -> tuple[str, bytes]:
    """A valid fixture, re-encoded (compact or pretty, escapes, BOM) with unknown fields added."""
    name = draw(st.sampled_from(sorted(FIXTURES)))
    body = copy.deepcopy(FIXTURES[name])
    for _ in range(draw(st.integers(0, 3))):
        body[f"x_{draw(st.text(max_size=8))}"] = draw(json_values)
    text: bytes = draw(encoded(body))
    # Only the encodings orjson reads: a BOM other than UTF-8's, or lone surrogates, are refusals.
    if text.startswith(b"\xff\xfe") or text.startswith(b" \n\t"):
        text = text[3:] if text.startswith(b" \n\t") else text[2:]
    return name, text


def check_round_trip(case: tuple[str, bytes]) -> None:
    name, raw = case
    original = parse_event(orjson.loads(FIXTURE_BYTES[name]))
    try:
        # As the ingress does before parsing (and storing) a body.
        value = parse_json(raw.removeprefix(BOM), "application/json", MAX_DEPTH)
    except (MalformedJson, NumberOutOfRange):
        return  # an added unknown field held a lone surrogate or a huge number: refused
    event = parse_event(parse_envelope(value))

    assert event.model_dump(mode="json") == original.model_dump(mode="json")
    again = type(event).model_validate_json(event.model_dump_json())
    assert again.model_dump(mode="json") == original.model_dump(mode="json")
    assert again == type(event).model_validate(event.model_dump())


@budget(local=60, ci=300)
@given(case=re_encoded())
def test_valid_fixtures_round_trip_however_encoded(case: tuple[str, bytes]) -> None:
    check_round_trip(case)
