"""Hypothesis strategies of hostile input: bodies, headers and paths an attacker (or a buggy
sender) may send to the ingress, and the budget every property test of this package runs with.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.conftest import fixture_files

JSON = Any
Draw = Callable[[st.SearchStrategy[Any]], Any]

IN_CI = os.environ.get("CI", "").lower() == "true"

FIXTURE_BYTES: dict[str, bytes] = {f.name: f.read_bytes() for f in fixture_files()}
"""Every Calenso sample (current and planned) as sent, by file name."""
FIXTURES: dict[str, dict[str, Any]] = {n: json.loads(b) for n, b in FIXTURE_BYTES.items()}
FIXTURE_TYPES = sorted({str(body["type"]) for body in FIXTURES.values()})

UTF8_BOM = b"\xef\xbb\xbf"


def budget(local: int, ci: int) -> settings:
    """Settings of one property test: ``local`` examples on a laptop, ``ci`` when CI=true.

    No deadline: the machine is shared (2 cores, other test runs), so a slow example is not a
    finding; the example count bounds the time instead. Hypothesis's health checks about slow
    data generation and big inputs are off for the same reason, and because the fixtures a test
    uses are deliberately shared by all its examples.
    """
    return settings(
        max_examples=ci if IN_CI else local,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.large_base_example,
        ],
        print_blob=True,
    )


# --- JSON values -----------------------------------------------------------------------------

# Every code point, lone surrogates included: encoded with ensure_ascii they become \uXXXX
# escapes (valid JSON text that orjson refuses), encoded raw they become invalid UTF-8.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
    | st.sampled_from(["", " ", "0", "1", "null", "2025-03-14 09:12:47", "\\/", "\ufeff"])
)
json_values: st.SearchStrategy[JSON] = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def encoded(draw: Draw, value: JSON) -> bytes:
    """``value`` as JSON text the way some sender might write it: compact or pretty, ASCII or
    raw UTF-8, PHP's ``\\/`` escapes, a byte order mark."""
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1, 3])),
        separators=draw(st.sampled_from([None, (",", ":")])),
    )
    if draw(st.booleans()):
        text = text.replace("/", "\\/")
    body = text.encode("utf-8", "surrogatepass")
    prefix: bytes = draw(st.sampled_from([b"", b"", b"", UTF8_BOM, b"\xff\xfe", b" \n\t"]))
    return prefix + body


# --- near-valid Calenso envelopes ------------------------------------------------------------


def _paths(value: JSON, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found: list[tuple[str | int, ...]] = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _replace(root: dict[str, Any], path: tuple[str | int, ...], new: JSON, *, drop: bool) -> None:
    parent: Any = root
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if drop and isinstance(parent, dict):
        del parent[last]
    else:
        parent[last] = new


@st.composite
def near_valid_envelopes(draw: Draw) -> dict[str, Any] | list[Any]:
    """A fixture with a few of its fields changed, removed or added: the envelope's own fields
    (``type``, ``data``, ``created``, ``source``) as much as values deep inside ``data``."""
    body = copy.deepcopy(FIXTURES[draw(st.sampled_from(sorted(FIXTURES)))])
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["top", "drop_top", "deep", "extra", "type"]))
        if action == "top":
            body[draw(st.sampled_from(["type", "data", "created", "source"]))] = draw(json_values)
        elif action == "drop_top":
            body.pop(draw(st.sampled_from(["type", "data", "created", "source"])), None)
        elif action == "type":
            body["type"] = draw(
                st.sampled_from([*FIXTURE_TYPES, "", " ", "x" * 5000, "customer.created\x00"])
                | any_text
            )
        elif action == "extra":
            body[draw(any_text)] = draw(json_values)
        else:
            data = body.get("data")
            paths = _paths(data, ("data",)) if isinstance(data, dict) else []
            if paths:
                path = draw(st.sampled_from(paths))
                _replace(body, path, draw(json_values), drop=draw(st.booleans()))
    if draw(st.integers(0, 20)) == 0:
        return [body]
    return body


# --- hostile JSON text -----------------------------------------------------------------------


@st.composite
def deep_nesting(draw: Draw) -> bytes:
    """Arrays or objects nested far beyond anything Calenso sends, at the top or inside data."""
    depth: int = draw(st.integers(1, 3000))
    if draw(st.booleans()):
        inner = "[" * depth + "]" * depth
    else:
        inner = '{"a":' * depth + "1" + "}" * depth
    if draw(st.booleans()):
        return f'{{"type":"customer.created","data":{{"customer":{inner}}}}}'.encode()
    return inner.encode()


@st.composite
def huge_numbers(draw: Draw) -> bytes:
    """Numbers no double or 64-bit integer holds, where an id, a price or the whole body go."""
    number: str = draw(
        st.sampled_from(
            [
                "1" * 5000,
                "-" + "9" * 400,
                "1e400",
                "-1e-400",
                "0." + "1" * 3000,
                "18446744073709551616",
                "-9223372036854775809",
                "1E+2147483648",
                "NaN",
                "Infinity",
                "-0",
            ]
        )
        | st.integers(min_value=-(10**60), max_value=10**60).map(str)
    )
    template: str = draw(
        st.sampled_from(
            [
                "{}",
                '{{"type":"customer.created","data":{{"customer":{{"id":{}}}}}}}',
                '{{"type":"appointment.booking.created","data":{{"appointment_services":'
                '[{{"price":{}}}],"appointment":{{"uuid":"u"}}}}}}',
                '{{"type":{},"data":{{}}}}',
                '{{"type":"customer.created","created":{},"data":{{}}}}',
            ]
        )
    )
    return template.format(number).encode()


@st.composite
def re_encoded_fixtures(draw: Draw) -> bytes:
    """A fixture's raw bytes, or re-encoded in another encoding or with a byte order mark."""
    name = draw(st.sampled_from(sorted(FIXTURES)))
    text = json.dumps(FIXTURES[name], ensure_ascii=draw(st.booleans()))
    codec = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "cp1252"]))
    return text.encode(codec, "replace")


bodies: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=1024),
    json_values.flatmap(encoded),
    near_valid_envelopes().flatmap(encoded),
    deep_nesting(),
    huge_numbers(),
    re_encoded_fixtures(),
)
"""Any body: random bytes, random JSON, near-valid envelopes, deep nesting, huge numbers, BOMs."""


# --- headers ---------------------------------------------------------------------------------

# A header value as bytes on the wire: printable ASCII, tabs, bytes that are not UTF-8. No CR or
# LF (that would be a different request, not a strange header). Control characters are a strategy
# of their own: aiohttp refuses them before the app sees the request, and echoes them.
_CONTROL = frozenset(range(0x20)) - {0x09} | {0x7F}
header_bytes = st.binary(max_size=60).map(
    lambda raw: bytes(b for b in raw if b not in _CONTROL).strip(b" \t")
)
control_header_bytes = st.binary(min_size=1, max_size=30).map(
    lambda raw: bytes(b for b in raw if b not in b"\r\n") + b"\x01"
)


content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "APPLICATION/JSON",
            "text/json",
            "application/vnd.calenso+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
            "application/octet-stream",
            "application/xml",
            "json",
            ";",
            "",
        ]
    ),
    header_bytes,
)
