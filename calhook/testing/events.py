"""Calenso events for tests, built from the samples calhook ships (``samples/``, one per type and
shape; the people in them are invented).

::

    sample = calenso_event("appointment.booking.cancelled", shape="flat",
                           customer={"email": "anna@example.org"})
    sample.event      # the model a handler receives (AppointmentEvent)
    sample.body       # the bytes Calenso would post

An override names a part of the payload (``customer``, ``appointment``, ``worker``, ``store``,
``user``, ``lead``, ``payment``, ``event``, ``event_slot`` …) and the fields to change in it, by
Calenso's names (``prename``, ``lastname``, not the model's ``first_name``), wherever the part
sits in the type's payload (an appointment's customer is inside the appointment); in the flat
shape the same fields are written under their flat keys (``appointment_customer_email``). A part
or field the sample does not have is refused (a typo would change nothing the handler reads);
``data=`` merges anything into ``data`` itself, ``created=`` sets the envelope's time (Calenso's
naive ``"YYYY-MM-DD HH:MM:SS"``).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from schemas import CalensoEvent, parse_event

SAMPLES = Path(__file__).with_name("samples")
SHAPES = ("nested", "flat")


class SampleError(ValueError):
    """Raised for a type or shape calhook has no sample of, or an override that does not fit."""


@dataclass(frozen=True)
class Sample:
    """One event as Calenso would post it: its type, shape and payload (a fresh copy each)."""

    type: str
    shape: str
    payload: dict[str, Any] = field(repr=False)

    @property
    def body(self) -> bytes:
        """The request body."""
        return orjson.dumps(self.payload)

    @property
    def event(self) -> CalensoEvent:
        """The model the handlers of its type receive."""
        return parse_event(copy.deepcopy(self.payload))


@functools.cache
def sample_types() -> dict[str, tuple[str, ...]]:
    """Each type calhook has samples of, and the shapes it has it in."""
    found: dict[str, list[str]] = {}
    for path in sorted(SAMPLES.glob("*.json")):
        event_type, shape = path.name.removesuffix(".json").rsplit(".", 1)
        found.setdefault(event_type, []).append(shape)
    return {t: tuple(s for s in SHAPES if s in shapes) for t, shapes in found.items()}


@functools.cache
def _load(event_type: str, shape: str) -> bytes:
    return (SAMPLES / f"{event_type}.{shape}.json").read_bytes()


def calenso_event(
    event_type: str,
    shape: str = "nested",
    *,
    created: str | None = None,
    data: dict[str, Any] | None = None,
    **parts: dict[str, Any],
) -> Sample:
    """A sample event of ``event_type`` in ``shape``, with the overrides given (see the module
    docstring)."""
    shapes = sample_types().get(event_type)
    if shapes is None:
        known = ", ".join(sorted(sample_types()))
        raise SampleError(f"no sample of {event_type!r}; there are: {known}")
    if shape not in shapes:
        raise SampleError(f"no {shape} sample of {event_type!r}; it comes as: {', '.join(shapes)}")
    payload: dict[str, Any] = orjson.loads(_load(event_type, shape))
    if created is not None:
        payload["created"] = created
    body = payload.setdefault("data", {})
    if data:
        _merge(body, data)
    for part, fields in parts.items():
        if not isinstance(fields, dict):
            raise SampleError(f"{part}=: give the fields to change as a dict")
        path = _path_of(event_type, part)
        if path is None:
            raise SampleError(
                f"a {event_type} payload has no {part!r}; to add to it, use data={{...}}"
            )
        if shape == "nested":
            target = body
            for key in path:
                target = target.setdefault(key, {})
            _check_fields(part, fields, set(target))
            _merge(target, fields)
        else:
            prefix = "_".join(path)
            _check_fields(part, fields, {k.removeprefix(f"{prefix}_") for k in body})
            for key, value in fields.items():
                body[f"{prefix}_{key}"] = value
    return Sample(event_type, shape, payload)


def _check_fields(part: str, fields: dict[str, Any], known: set[str]) -> None:
    """An override names fields the payload has, as Calenso names them (``prename``, not the
    model's ``first_name``); a typo would otherwise change nothing the handler reads."""
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SampleError(
            f"{part} has no field {', '.join(map(repr, unknown))} in Calenso's payload (it has: "
            f"{', '.join(sorted(known))}); a field the sample lacks goes in with data={{...}}"
        )


def _path_of(event_type: str, part: str) -> list[str] | None:
    """Where ``part`` sits in the nested payload of ``event_type`` (``["appointment",
    "customer"]``), breadth first; None when the sample has none (a type with no nested sample:
    ``[part]`` if its flat sample has keys for it)."""
    shapes = sample_types()[event_type]
    if "nested" not in shapes:
        flat = orjson.loads(_load(event_type, "flat"))["data"]
        return [part] if any(k.startswith(f"{part}_") for k in flat) else None
    queue: list[tuple[list[str], Any]] = [([], orjson.loads(_load(event_type, "nested"))["data"])]
    while queue:
        path, node = queue.pop(0)
        if isinstance(node, dict):
            for key, value in node.items():
                if key == part and (isinstance(value, dict) or value is None):
                    return [*path, key]
                queue.append(([*path, key], value))
    return None


def _merge(target: dict[str, Any], fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
