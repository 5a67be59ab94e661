"""Find each canonical field in Calenso's ``data``, whatever its shape.

Calenso sends ``data`` nested (``{"appointment": {"customer": {"email": …}}}``) or flat, with keys
joined by ``_`` (``appointment_customer_email``, ``appointment_services_0_name``) or by ``.``
(``appointment.customer.email``). Splitting ``_`` keys back into a tree is ambiguous
(``event_slot_id``, ``start_utc``), so this module walks the other way: the models declare where
each field may be (:class:`Keys`), and :func:`resolve` probes those paths in every encoding.

Tie-breaks, in order:

1. A field's candidate paths are tried in declaration order (``appointment.customer`` before
   ``customer``). For a sub-object the first path under which *any* of its fields exists wins
   and all its fields are read under that path, so one object is never stitched from two places.
2. Within one path, the nested walk comes first, then ``.``-joined keys, then ``_``-joined keys,
   shorter joins before longer ones; mixed forms (``appointment_services.0.name``,
   ``{"appointment": {"customer_email": …}}``) are found too.
3. The first non-empty value wins; ``null`` or ``""`` is used only when nothing else is found.
4. Lists are probed at index 0, 1, 2, … until an index yields nothing. A nested list may also be
   an object with ``"0"``, ``"1"`` keys (how PHP encodes some arrays).
"""

from __future__ import annotations

import functools
import itertools
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

Path = tuple[str, ...]

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Keys:
    """Field metadata: the paths under which Calenso may send a field, most specific first."""

    paths: tuple[Path, ...]


def keys(*paths: str | Path) -> Keys:
    """Declare candidate paths; a string is a one-segment path, a tuple a nested one."""
    return Keys(tuple((path,) if isinstance(path, str) else path for path in paths))


@dataclass(frozen=True, slots=True)
class _FieldPlan:
    name: str
    paths: tuple[Path, ...]
    model: type[BaseModel] | None
    many: bool


def _unwrap(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """Return the sub-model inside ``X | None`` or ``list[X]``, and whether it is a list."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
        return None, False
    if origin is list:
        (item,) = get_args(annotation)
        model, _ = _unwrap(item)
        return model, model is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


@functools.cache
def _plan(model: type[BaseModel]) -> tuple[_FieldPlan, ...]:
    # A model may list the fields that come from ``data``; envelope fields are then left alone.
    names: Sequence[str] | None = getattr(model, "data_fields", None)
    if names is None:
        names = tuple(model.model_fields)
    plans = []
    for name in names:
        field = model.model_fields[name]
        declared = next((meta for meta in field.metadata if isinstance(meta, Keys)), None)
        sub_model, many = _unwrap(field.annotation)
        paths = declared.paths if declared is not None else ((name,),)
        plans.append(_FieldPlan(name, paths, sub_model, many))
    return tuple(plans)


def _empty(value: Any) -> bool:
    return value is None or value == ""


def _joined(segments: Path) -> tuple[str, ...]:
    if len(segments) == 1:
        return segments
    return ".".join(segments), "_".join(segments)


def _lookup(node: Any, path: Path) -> Any:
    """Return the value at ``path`` below ``node`` in any encoding, or ``_MISSING``."""
    if not path:
        return node
    fallback = _MISSING
    if isinstance(node, Mapping):
        for length in range(1, len(path) + 1):
            for key in _joined(path[:length]):
                if key not in node:
                    continue
                found = _lookup(node[key], path[length:])
                if found is _MISSING:
                    continue
                if not _empty(found):
                    return found
                if fallback is _MISSING:
                    fallback = found
    elif isinstance(node, list) and path[0].isdigit():
        index = int(path[0])
        if index < len(node):
            return _lookup(node[index], path[1:])
    return fallback


def _first(data: Mapping[str, Any], candidates: Sequence[Path]) -> Any:
    fallback = _MISSING
    for path in candidates:
        found = _lookup(data, path)
        if found is _MISSING:
            continue
        if not _empty(found):
            return found
        if fallback is _MISSING:
            fallback = found
    return fallback


def _resolve_object(
    model: type[BaseModel], data: Mapping[str, Any], candidates: Sequence[Path]
) -> dict[str, Any] | None:
    for path in candidates:
        fields = _resolve_under(model, data, path)
        if fields:
            return fields
    return None


def _resolve_under(model: type[BaseModel], data: Mapping[str, Any], prefix: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for plan in _plan(model):
        candidates = [prefix + path for path in plan.paths]
        if plan.model is None:
            value = _first(data, candidates)
            if value is not _MISSING:
                out[plan.name] = value
        elif plan.many:
            items = []
            for index in itertools.count():
                item = _resolve_object(plan.model, data, [(*c, str(index)) for c in candidates])
                if item is None:
                    break
                items.append(item)
            if items:
                out[plan.name] = items
        else:
            item = _resolve_object(plan.model, data, candidates)
            if item is not None:
                out[plan.name] = item
    return out


def resolve(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``model``'s data fields found in ``data`` (nested or flat), keyed by field name.

    Fields that are absent are left out, so the model's defaults (or its "field required"
    errors) apply. Values are returned as sent; the model's types do the conversion.

    This is the reference; :func:`schemas._flat_cache.resolve` gives the same result from a
    cache of programs, one per payload shape, and is what :func:`schemas.parse_event` calls.
    """
    return _resolve_under(model, data, ())
