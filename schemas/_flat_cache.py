""":func:`schemas._flat.resolve`, memoised per payload shape: the same result, ~10x faster.

:func:`schemas._flat.resolve` probes every candidate path in every encoding, which costs hundreds
of microseconds per event, and every event is parsed twice (dispatch, then the handler). Its
answer depends only on the *shape* of ``data``: which keys each object has, how long each list
is, which leaves are empty (``null`` or ``""``) and which values are objects or lists. Senders
repeat a handful of shapes, so :func:`resolve` computes a signature of the shape, runs the
reference resolver once per (model, signature) and keeps what it did as a :class:`_Program`: for
each output field, the concrete path in ``data`` it came from. A payload of a known shape then
only has its values fetched along those paths, into the same nested dicts and lists.

The reference runs on a stand-in of ``data`` (:func:`_stand_in`): the same keys, lists and
emptiness, each value knowing its container and key. So the tie-break rules live in one place,
:mod:`schemas._flat`, and a program is, by construction, what the reference does on every
payload of that shape. A shape seen for the first time costs about 1.5 times the reference.

A payload that is too big or too deep for a cheap signature, or holds anything but JSON types,
goes straight to the reference, as do payloads that are not plain dicts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from pydantic import BaseModel

from schemas._flat import _plan
from schemas._flat import resolve as resolve_reference

MAX_SHAPE_TOKENS = 2048
"""Signature size (about one token per key, list item and container) past which a payload is
resolved without the cache: bounds both the signature work and each entry's memory."""
MAX_SHAPE_DEPTH = 32
"""Nesting past which a payload is resolved without the cache; Calenso nests 3 deep."""
MAX_SHAPE_KEY_CHARS = 16_384
"""Total length of the keys of a shape past which it is not cached (it would stay in memory)."""
MAX_PROGRAMS = 256
"""Programs kept, least recently used evicted; a sender uses a few shapes per event family."""

Key = str | int

# Signature tokens: a dict is the tuple of its keys, then its values, then _END; a list is _LIST,
# its items, then _END; a scalar is True when empty. Key tuples, bools and the two markers never
# equal one another, so the sequence parses one way only: no two shapes share a signature.
_LIST = object()
_END = object()
# Non-empty scalars all behave alike in the reference (not a Mapping, not a list, not empty), so
# their type is left out of the signature; ``str`` is tested for "" separately. A type missing
# here (a tuple, a str subclass, …) is not JSON: that payload goes to the reference.
_EMPTY_BY_TYPE: dict[type, bool] = {type(None): True, int: False, float: False, bool: False}


class _TooBig(Exception):
    """Raised inside the signature walk when the payload passes a MAX_SHAPE_* bound."""


def signature(data: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """Return a hashable token sequence of ``data``'s shape, or ``None`` when it is not cached.

    Two payloads with the same signature have the same keys (in the same order), lists of the
    same lengths and empty leaves in the same places, which is all :mod:`schemas._flat` looks at.
    """
    if type(data) is not dict:
        return None
    tokens: list[Any] = []
    try:
        _walk_dict(data, tokens, 0)
    except (_TooBig, KeyError):  # KeyError: a value type outside _EMPTY_BY_TYPE
        return None
    return tuple(tokens)


def _walk_dict(node: dict[Any, Any], tokens: list[Any], depth: int) -> None:
    # Checked per container, not per leaf: a container adds at most len(node) + 2 tokens of its
    # own, so the work stays within the bound plus one container's length check.
    if depth > MAX_SHAPE_DEPTH or len(tokens) + len(node) > MAX_SHAPE_TOKENS:
        raise _TooBig
    add = tokens.append
    add(tuple(node))
    for value in node.values():
        kind = type(value)
        if kind is str:
            add(value == "")
        elif kind is dict:
            _walk_dict(value, tokens, depth + 1)
        elif kind is list:
            _walk_list(value, tokens, depth + 1)
        else:
            add(_EMPTY_BY_TYPE[kind])
    add(_END)


def _walk_list(node: list[Any], tokens: list[Any], depth: int) -> None:
    if depth > MAX_SHAPE_DEPTH or len(tokens) + len(node) > MAX_SHAPE_TOKENS:
        raise _TooBig
    add = tokens.append
    add(_LIST)
    for value in node:
        kind = type(value)
        if kind is str:
            add(value == "")
        elif kind is dict:
            _walk_dict(value, tokens, depth + 1)
        elif kind is list:
            _walk_list(value, tokens, depth + 1)
        else:
            add(_EMPTY_BY_TYPE[kind])
    add(_END)


# --- the stand-in the reference runs on ------------------------------------------------------


class _Dict(dict[str, Any]):
    """An object of the stand-in: the same keys, values replaced by stand-ins."""

    __slots__ = ("key", "parent")

    parent: _Dict | _List | None  # None for the stand-in of ``data`` itself
    key: Key


class _List(list[Any]):
    """A list of the stand-in: the same length, items replaced by stand-ins."""

    __slots__ = ("key", "parent")

    parent: _Dict | _List
    key: Key


class _Leaf(str):
    """A scalar of the stand-in: ``""`` where the original is empty (None or ""), else ``"x"``.

    A str, so the reference's ``value == ""`` stays a C comparison; ``is None`` is never true
    for it, and ``== ""`` answers for both kinds of empty.
    """

    parent: _Dict | _List
    key: Key


_StandIn = _Dict | _List | _Leaf
_STAND_INS = (_Dict, _List, _Leaf)  # a tuple: isinstance is faster with one than with a union


class _NotCacheable(Exception):
    """Raised while building a stand-in for a key that is not a ``str``."""


def _stand_in(value: Any, parent: _Dict | _List | None, key: Key) -> _StandIn:
    """Mirror ``value``, whose signature was taken (so its types and size are known good)."""
    kind = type(value)
    if kind is dict:
        node = _Dict()
        node.parent, node.key = parent, key
        for child_key, child in value.items():
            # Only str keys: equal signatures then mean equal keys as the reference sees them,
            # whereas 1, 1.0 and True are equal keys of different types.
            if type(child_key) is not str:
                raise _NotCacheable
            node[child_key] = _stand_in(child, node, child_key)
        return node
    if kind is list:
        items = _List()
        items.parent, items.key = parent, key  # type: ignore[assignment]
        items.extend(_stand_in(child, items, index) for index, child in enumerate(value))
        return items
    leaf = _Leaf("" if value is None or value == "" else "x")
    leaf.parent, leaf.key = parent, key  # type: ignore[assignment]
    return leaf


# --- programs ------------------------------------------------------------------------------

Nodes = list[Any]
Builder = Callable[[Nodes], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class _Program:
    """How to build one model's resolution from a payload of one shape.

    ``steps`` fetch the containers that fields are read from: step ``i`` makes node ``i + 1`` as
    ``nodes[source][key]`` (node 0 is ``data``); ``build`` makes the output from the nodes.
    """

    steps: tuple[tuple[int, Key], ...]
    build: Builder

    def run(self, data: Mapping[str, Any]) -> dict[str, Any]:
        nodes: Nodes = [data]
        add = nodes.append
        for source, key in self.steps:
            add(nodes[source][key])
        return self.build(nodes)


# A part of an output dict adds one or more fields to it, in the reference's order.
Part = Callable[[dict[str, Any], Nodes], None]


def _fields_part(node: int, names: tuple[str, ...], keys: tuple[Key, ...]) -> Part:
    if len(keys) == 1:
        name, key = names[0], keys[0]

        def one(out: dict[str, Any], nodes: Nodes) -> None:
            out[name] = nodes[node][key]

        return one
    values = itemgetter(*keys)

    def many(out: dict[str, Any], nodes: Nodes) -> None:
        out.update(zip(names, values(nodes[node]), strict=False))

    return many


def _object_part(name: str, build: Builder) -> Part:
    def part(out: dict[str, Any], nodes: Nodes) -> None:
        out[name] = build(nodes)

    return part


def _objects_part(name: str, builds: tuple[Builder, ...]) -> Part:
    def part(out: dict[str, Any], nodes: Nodes) -> None:
        out[name] = [build(nodes) for build in builds]

    return part


def _node_part(name: str, node: int) -> Part:
    def part(out: dict[str, Any], nodes: Nodes) -> None:
        out[name] = nodes[node]

    return part


def _one_node_builder(node: int, names: tuple[str, ...], keys: tuple[Key, ...]) -> Builder:
    # The common case, every field of an object read from one node: one C-level call.
    values = itemgetter(*keys)

    def build(nodes: Nodes) -> dict[str, Any]:
        return dict(zip(names, values(nodes[node]), strict=False))

    return build


def _single_object_builder(name: str, build_object: Builder) -> Builder:
    def build(nodes: Nodes) -> dict[str, Any]:
        return {name: build_object(nodes)}

    return build


def _parts_builder(parts: tuple[Part, ...]) -> Builder:
    def build(nodes: Nodes) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in parts:
            part(out, nodes)
        return out

    return build


# Consecutive fields read from one node, while a builder is compiled: (node, names, keys).
_Run = tuple[int, list[str], list[Key]]


class _Compiler:
    """Turns the reference's output on a stand-in into a :class:`_Program`."""

    def __init__(self, root: _Dict) -> None:
        # Stand-ins are unhashable containers; they outlive the compiler, so their ids are stable.
        self.node_of: dict[int, int] = {id(root): 0}
        self.steps: list[tuple[int, Key]] = []

    def program(self, resolved: dict[str, Any]) -> _Program:
        build = self.builder(resolved)
        return _Program(tuple(self.steps), build)

    def node(self, container: _Dict | _List) -> int:
        index = self.node_of.get(id(container))
        if index is None:
            assert container.parent is not None  # only the root has none, and it is node 0
            source = self.node(container.parent)
            self.steps.append((source, container.key))
            index = self.node_of[id(container)] = len(self.steps)
        return index

    def builder(self, resolved: dict[str, Any]) -> Builder:
        if len(resolved) == 1:
            ((name, value),) = resolved.items()
            if type(value) is dict:  # a customer or lead event: one sub-object, nothing else
                return _single_object_builder(name, self.builder(value))
        items: list[_Run | Part] = []
        for name, value in resolved.items():
            if isinstance(value, _STAND_INS):
                if value.parent is None:  # the field is ``data`` itself (a key declared as ())
                    items.append(_node_part(name, 0))
                    continue
                node, key = self.node(value.parent), value.key
                last = items[-1] if items else None
                if isinstance(last, tuple) and last[0] == node:
                    last[1].append(name)
                    last[2].append(key)
                else:
                    items.append((node, [name], [key]))
            elif type(value) is dict:
                items.append(_object_part(name, self.builder(value)))
            elif type(value) is list:
                items.append(_objects_part(name, tuple(self.builder(item) for item in value)))
            else:
                raise TypeError(f"unexpected {type(value).__name__} in a resolution")
        if len(items) == 1 and isinstance(items[0], tuple) and len(items[0][2]) > 1:
            node, names, keys = items[0]
            return _one_node_builder(node, tuple(names), tuple(keys))
        return _parts_builder(
            tuple(
                _fields_part(item[0], tuple(item[1]), tuple(item[2]))
                if isinstance(item, tuple)
                else item
                for item in items
            )
        )


# --- the cache -----------------------------------------------------------------------------

_programs: OrderedDict[tuple[Any, ...], _Program] = OrderedDict()
# Taken only to learn a shape; a hit reads the OrderedDict, whose single operations are atomic.
_learning = threading.Lock()


def resolve(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """Return what :func:`schemas._flat.resolve` returns for ``model`` and ``data``, faster.

    The result has the same keys in the same order, and every value is the very object the
    reference would return (an object or list sent where a scalar is expected included).
    """
    # A model without data fields (UnknownEvent) gets {} at once, and fills no cache entry
    # whatever the shape of the payloads it is sent.
    shape = signature(data) if _plan(model) else None
    if shape is None:
        return resolve_reference(model, data)
    key = (model, shape)
    program = _programs.get(key)
    if program is None:
        return _learn(model, data, key)
    # Not contextlib.suppress: it costs more than the rest of a hit's bookkeeping.
    try:  # noqa: SIM105
        _programs.move_to_end(key)
    except KeyError:  # evicted by another thread since the get
        pass
    return program.run(data)


def _learn(model: type[BaseModel], data: Mapping[str, Any], key: tuple[Any, ...]) -> dict[str, Any]:
    try:
        stand_in = _stand_in(data, None, "")
    except _NotCacheable:
        return resolve_reference(model, data)
    key_chars = sum(len(name) for token in key[1] if type(token) is tuple for name in token)
    if key_chars > MAX_SHAPE_KEY_CHARS:
        return resolve_reference(model, data)
    assert isinstance(stand_in, _Dict)
    program = _Compiler(stand_in).program(resolve_reference(model, stand_in))
    with _learning:
        _programs[key] = program
        while len(_programs) > MAX_PROGRAMS:
            _programs.popitem(last=False)
    return program.run(data)


def cached_programs() -> int:
    """How many shapes are cached (for tests and diagnostics)."""
    return len(_programs)


def clear() -> None:
    """Forget every cached program (tests use it to start from a cold cache)."""
    with _learning:
        _programs.clear()
