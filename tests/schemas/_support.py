"""Shared helpers for the schemas tests: the fixture files and payload rewriters."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "calenso"


def fixture_names() -> list[str]:
    """Every sample payload, relative to FIXTURES (``planned/…`` included), sorted."""
    return sorted(
        path.relative_to(FIXTURES).as_posix()
        for path in FIXTURES.rglob("*.json")
        if path.name.endswith((".nested.json", ".flat.json"))
    )


def load(name: str) -> dict[str, Any]:
    """Decode one fixture into a fresh dict (tests may mutate it)."""
    body = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(body, dict)
    return body


def flatten(data: Any, sep: str, prefix: str = "") -> dict[str, Any]:
    """Flatten nested ``data`` the way a flat webhook would, joining keys with ``sep``.

    Empty lists and objects stay as values, as in the ``_`` fixtures
    (``appointment_child_appointments: []``).
    """
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for key, value in data.items():
            out.update(flatten(value, sep, f"{prefix}{sep}{key}" if prefix else key))
    elif isinstance(data, list) and data:
        for index, value in enumerate(data):
            out.update(flatten(value, sep, f"{prefix}{sep}{index}"))
    else:
        out[prefix] = data
    return out


def with_data(body: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` with ``data`` replaced."""
    result = copy.deepcopy(body)
    result["data"] = data
    return result


def canonical(event: Any) -> dict[str, Any]:
    """The shape-independent view used to compare events parsed from different encodings."""
    view = event.model_dump(mode="json", exclude={"shape"})
    assert isinstance(view, dict)
    return view
