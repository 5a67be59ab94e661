"""The memoised resolver gives exactly what the reference resolver gives, on every payload.

"Exactly": the same nested dicts and lists, keys in the same order, and every value the very
object the reference returns (``is``), so a container sent where a scalar is expected reaches
the model unchanged. Checked on every fixture, in every encoding, and on generated payloads: a
cold cache, a warm one, payloads of a learnt shape with other values, payloads whose empty leaves
moved, and hostile ones that must bypass the cache.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas import _flat_cache
from schemas._flat import _plan
from schemas._flat import resolve as resolve_reference
from schemas._flat_cache import resolve, signature
from schemas.events import EVENT_MODELS, AppointmentEvent, UnknownEvent
from schemas.parts import Appointment, Customer, Service
from tests.schemas._support import fixture_names, flatten, load
from tests.security._strategies import budget

Draw = Callable[[st.SearchStrategy[Any]], Any]

# Every model resolve() is called with, and parts on their own (a part is a model too).
MODELS: tuple[type[BaseModel], ...] = (*EVENT_MODELS, Appointment, Customer, Service)


def _containers(value: Any, seen: set[int]) -> set[int]:
    """The ids of every dict and list in ``value`` (cycles included, each visited once)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list) and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
    return seen


def assert_same(fast: Any, reference: Any, data: Any) -> None:
    """``fast`` has the structure and key order of ``reference``, and the very same values."""
    _same(fast, reference, _containers(data, set()), "")


def _same(fast: Any, reference: Any, from_data: set[int], at: str) -> None:
    if id(reference) in from_data or not isinstance(reference, dict | list):
        assert fast is reference, f"{at or 'result'}: {fast!r} is not the reference's value"
    elif isinstance(reference, dict):
        assert type(fast) is dict, at
        assert list(fast) == list(reference), f"{at}: keys or their order differ"
        for key, value in reference.items():
            _same(fast[key], value, from_data, f"{at}.{key}")
    else:
        assert type(fast) is list, at
        assert len(fast) == len(reference), f"{at}: lengths differ"
        for index, value in enumerate(reference):
            _same(fast[index], value, from_data, f"{at}[{index}]")


def check_all_models(data: dict[str, Any]) -> None:
    """Resolve ``data`` for every model, twice (learning, then from the cache)."""
    for model in MODELS:
        reference = resolve_reference(model, data)
        assert_same(resolve(model, data), reference, data)
        assert_same(resolve(model, data), reference, data)


@pytest.fixture(autouse=True)
def cold_cache() -> Iterator[None]:
    _flat_cache.clear()
    yield
    _flat_cache.clear()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fixture_names())
@pytest.mark.parametrize("encoding", ["as sent", "_", "."])
def test_every_fixture_in_every_encoding(name: str, encoding: str) -> None:
    data = load(name)["data"]
    if encoding != "as sent":
        data = flatten(data, encoding)
    check_all_models(data)


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_with_php_lists_and_a_mixed_encoding(name: str) -> None:
    data = _php_lists(load(name)["data"])
    # Half of the top-level objects flattened, the others kept nested.
    mixed: dict[str, Any] = {}
    for index, (key, value) in enumerate(data.items()):
        if index % 2 and isinstance(value, dict):
            mixed.update(flatten(value, ".", key))
        else:
            mixed[key] = value
    check_all_models(data)
    check_all_models(mixed)


def _php_lists(value: Any) -> Any:
    """Lists sent as ``{"0": …, "1": …}`` objects, as PHP encodes some arrays."""
    if isinstance(value, dict):
        return {key: _php_lists(child) for key, child in value.items()}
    if isinstance(value, list):
        return {str(index): _php_lists(child) for index, child in enumerate(value)}
    return value


@pytest.mark.parametrize("encoding", ["nested", "_", ".", "php"])
def test_lists_of_several_objects(encoding: str) -> None:
    data = load("appointment.booking.created.nested.json")["data"]
    counter = iter(range(10**6))
    # Distinct values (not copies, which share their strings), so a wrong index shows.
    data["appointment_services"] = [_other_values(data["appointment_services"][0], counter)] * 3
    data["appointment_services"] = _other_values(data["appointment_services"], counter)
    data["appointment"]["child_appointments"] = [{"uuid": f"child-{i}"} for i in range(3)]
    if encoding == "php":
        data = _php_lists(data)
    elif encoding != "nested":
        data = flatten(data, encoding)
    check_all_models(data)
    services = resolve(AppointmentEvent, data)["services"]
    assert len(services) == 3
    assert len({service["name"] for service in services}) == 3


def test_a_learnt_shape_is_reused_for_another_payload_of_that_shape() -> None:
    first = load("appointment.booking.created.nested.json")["data"]
    second = _other_values(first, iter(range(10**6)))
    model = AppointmentEvent

    assert signature(first) == signature(second)
    resolve(model, first)
    assert _flat_cache.cached_programs() == 1
    result = resolve(model, second)

    assert _flat_cache.cached_programs() == 1
    assert_same(result, resolve_reference(model, second), second)
    assert result["appointment"]["uuid"] == second["appointment"]["uuid"]


def _other_values(value: Any, counter: Iterator[int]) -> Any:
    """The same shape, every non-empty scalar replaced by a new string."""
    if isinstance(value, dict):
        return {key: _other_values(child, counter) for key, child in value.items()}
    if isinstance(value, list):
        return [_other_values(child, counter) for child in value]
    if value is None or value == "":
        return value
    return f"v{next(counter)}"


def test_containers_sent_for_scalars_are_passed_on_as_the_same_objects() -> None:
    data: dict[str, Any] = {
        "appointment": {"uuid": "a-1", "title": {"de": "Termin"}, "remarks": [1, 2]},
        "appointment_services": [{"name": ["Cut"], "price": {}}],
        "customer_email": [],
    }
    check_all_models(data)
    result = resolve(AppointmentEvent, data)
    assert result["appointment"]["title"] is data["appointment"]["title"]
    assert result["services"][0]["name"] is data["appointment_services"][0]["name"]


def test_empty_and_missing_values_keep_the_reference_fallbacks() -> None:
    data = {
        "appointment": {"uuid": "", "title": None},
        "appointment_uuid": None,
        "appointment.uuid": "dotted",
        "worker_full_name": "",
        "worker_resource_name": None,
        "store": {"place": None},
        "store_city": "",
    }
    check_all_models(data)
    # The same keys with the empty leaves elsewhere: another shape, another program.
    moved = {**data, "appointment.uuid": None, "appointment": {"uuid": "nested", "title": ""}}
    check_all_models(moved)
    assert _flat_cache.cached_programs() == 2 * len([m for m in MODELS if _plan(m)])


# --- hostile payloads bypass the cache -------------------------------------------------------


def _deep_lists(depth: int) -> list[Any]:
    node: list[Any] = []
    for _ in range(depth):
        node = [node]
    return node


def _deep(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"uuid": "bottom"}
    for _ in range(depth):
        node = {"customer": node, "uuid": "u"}
    return node


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_deep(5000), id="5000 objects deep"),
        pytest.param({"customer": _deep_lists(40), "customer_uuid": "u"}, id="deep lists"),
        pytest.param(
            {f"customer_{i}": i for i in range(50_000)} | {"customer_uuid": "u"}, id="50k keys"
        ),
        pytest.param(
            {"appointment_services": [{"name": str(i)} for i in range(1000)]}, id="long list"
        ),
        pytest.param(
            {"customer": {"uuid": "u"}, 1: "int key", None: "null key"}, id="non-str keys"
        ),
        pytest.param({"customer": {"uuid": ("a", "tuple")}}, id="a tuple value"),
        pytest.param(
            {"customer": {"uuid": type("S", (str,), {})("str subclass")}}, id="str subclass"
        ),
    ],
)
def test_hostile_payloads_are_resolved_by_the_reference_and_not_cached(data: Any) -> None:
    for model in MODELS:
        assert_same(resolve(model, data), resolve_reference(model, data), data)
    assert _flat_cache.cached_programs() == 0


def test_a_cycle_is_resolved_by_the_reference() -> None:
    data: dict[str, Any] = {"customer": {"uuid": "u"}}
    data["customer"]["customer"] = data
    data["appointment"] = data
    for model in MODELS:
        assert_same(resolve(model, data), resolve_reference(model, data), data)
    assert _flat_cache.cached_programs() == 0


def test_long_keys_are_not_kept() -> None:
    data = {"customer_uuid": "u", "x" * (_flat_cache.MAX_SHAPE_KEY_CHARS + 1): 1}
    check_all_models(data)
    assert _flat_cache.cached_programs() == 0


def test_the_cache_keeps_at_most_max_programs() -> None:
    model = AppointmentEvent
    for index in range(_flat_cache.MAX_PROGRAMS + 40):
        data = {"appointment_uuid": "a", f"extra_{index}": None}
        assert_same(resolve(model, data), resolve_reference(model, data), data)
    assert _flat_cache.cached_programs() == _flat_cache.MAX_PROGRAMS


def test_threads_learning_and_evicting_at_once_get_the_reference_results() -> None:
    shapes = [{"appointment_uuid": f"a{i}", f"extra_{i}": None} for i in range(300)]
    failures: list[str] = []

    def work(offset: int) -> None:
        for index in range(len(shapes)):
            data = shapes[(index + offset) % len(shapes)]
            if resolve(AppointmentEvent, data) != resolve_reference(AppointmentEvent, data):
                failures.append(repr(data))

    threads = [threading.Thread(target=work, args=(offset,)) for offset in (0, 75, 150, 225)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures
    assert _flat_cache.cached_programs() == _flat_cache.MAX_PROGRAMS


def test_a_model_without_data_fields_fills_no_entry() -> None:
    assert resolve(UnknownEvent, {"customer": {"uuid": "u"}}) == {}
    assert _flat_cache.cached_programs() == 0


# --- generated payloads ----------------------------------------------------------------------


def _segments() -> list[str]:
    """Every key segment the models declare, so generated keys hit the probes."""
    found: set[str] = set()
    stack: list[type[BaseModel]] = list(MODELS)
    while stack:
        for plan in _plan(stack.pop()):
            found.update(segment for path in plan.paths for segment in path)
            if plan.model is not None:
                stack.append(plan.model)
    return sorted(found)


SEGMENTS = _segments()
keys = st.one_of(
    st.sampled_from(SEGMENTS),
    st.lists(st.sampled_from([*SEGMENTS, "0", "1", "2"]), min_size=2, max_size=4).flatmap(
        lambda parts: st.sampled_from(["_", "."]).map(lambda sep: sep.join(parts))
    ),
    st.sampled_from(["0", "1", "2", "extra", ""]),
)
empty_scalars = st.sampled_from([None, ""])
full_scalars = st.one_of(
    st.text(min_size=1, max_size=5),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.booleans(),
    st.sampled_from([" ", "0", "null"]),
)
scalars = st.one_of(empty_scalars, full_scalars)
json_data: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)
fixture_data = st.sampled_from(fixture_names()).map(lambda name: load(name)["data"])


@st.composite
def payloads(draw: Draw) -> dict[str, Any]:
    """A fixture's data, changed in place a few times, or a generated object of model keys."""
    if draw(st.booleans()):
        data: dict[str, Any] = draw(st.dictionaries(keys, json_data, max_size=6))
        return data
    data = copy.deepcopy(draw(fixture_data))
    if draw(st.booleans()):
        data = flatten(data, draw(st.sampled_from(["_", "."])))
    for _ in range(draw(st.integers(0, 6))):
        slots = _slots(data)
        if not slots:
            break
        parent, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["set", "empty", "drop", "add", "flatten", "php", "grow"]))
        value = parent[key]
        if action == "set":
            parent[key] = draw(json_data)
        elif action == "empty":
            parent[key] = draw(empty_scalars)
        elif action == "drop" and isinstance(parent, dict):
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(json_data)
        elif action == "flatten" and isinstance(parent, dict) and isinstance(value, dict):
            del parent[key]
            parent.update(flatten(value, draw(st.sampled_from(["_", "."])), key))
        elif action == "grow" and isinstance(value, list) and value:
            counter = iter(range(10**6))
            value.extend([_other_values(item, counter) for item in value])
        elif action == "php" and isinstance(value, list):
            parent[key] = {str(index): item for index, item in enumerate(value)}
    return data


def _slots(data: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) of the values in ``data``, at any depth."""
    found: list[tuple[Any, Any]] = []
    stack = [data]
    while stack:
        node = stack.pop()
        entries = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in entries:
            found.append((node, key))
            if isinstance(child, dict | list):
                stack.append(child)
    return found


def _redraw(value: Any, draw: Draw, flip: bool) -> Any:
    """``value`` with every scalar drawn anew: as empty as before, or (``flip``) maybe not."""
    if isinstance(value, dict):
        return {key: _redraw(child, draw, flip) for key, child in value.items()}
    if isinstance(value, list):
        return [_redraw(child, draw, flip) for child in value]
    empty = value is None or value == ""
    if flip and draw(st.integers(0, 3)) == 0:
        empty = not empty
    return draw(empty_scalars if empty else full_scalars)


def _skeleton(value: Any) -> Any:
    """What the reference can observe of ``value``: keys, lengths, emptiness, kinds."""
    if isinstance(value, dict):
        return ("object", tuple((key, _skeleton(child)) for key, child in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_skeleton(child) for child in value))
    return value is None or value == ""


# A small alphabet, so that different shapes often have similar token sequences.
tiny_data: st.SearchStrategy[Any] = st.recursive(
    st.sampled_from([None, "", "x", 0]),
    lambda children: (
        st.lists(children, max_size=2) | st.dictionaries(st.sampled_from("ab"), children)
    ),
    max_leaves=6,
)


@budget(local=500, ci=2000)
@given(
    st.dictionaries(st.sampled_from("ab"), tiny_data),
    st.dictionaries(st.sampled_from("ab"), tiny_data),
)
@example({"a": [None], "b": []}, {"a": None, "b": [[]]})
@example({"a": {}}, {"a": []})
@example({"a": [{}]}, {"a": [[]]})
def test_equal_signatures_mean_equal_shapes(first: dict[str, Any], second: dict[str, Any]) -> None:
    assert (signature(first) == signature(second)) == (_skeleton(first) == _skeleton(second))


@budget(local=300, ci=1500)
@given(payloads())
def test_generated_payloads(data: dict[str, Any]) -> None:
    check_all_models(data)


@budget(local=200, ci=1000)
@given(payloads(), st.data())
def test_same_shape_other_values_reuses_the_program(
    data: dict[str, Any], more: st.DataObject
) -> None:
    _flat_cache.clear()
    other = _redraw(data, more.draw, flip=False)
    assert signature(other) == signature(data)
    for model in MODELS:
        resolve(model, data)
    learnt = _flat_cache.cached_programs()
    for model in MODELS:
        assert_same(resolve(model, other), resolve_reference(model, other), other)
    assert _flat_cache.cached_programs() == learnt


@budget(local=200, ci=1000)
@given(payloads(), st.data())
def test_same_keys_other_empty_leaves(data: dict[str, Any], more: st.DataObject) -> None:
    check_all_models(data)
    moved = _redraw(data, more.draw, flip=True)
    for model in MODELS:
        assert_same(resolve(model, moved), resolve_reference(model, moved), moved)
