"""Event ids: UUIDv7 that sort by creation, unique, with fresh randomness in a forked child."""

from __future__ import annotations

import multiprocessing
import uuid

from calhook.ids import new_event_id, random_bits, random_uuid4


def test_ids_are_uuid7_and_strictly_increasing() -> None:
    ids = [new_event_id() for _ in range(20_000)]  # several per millisecond: the counter
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_random_uuid4_is_a_version_4_uuid_and_bits_are_bounded() -> None:
    values = {random_uuid4() for _ in range(5_000)}
    assert len(values) == 5_000
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in values)
    assert all(0 <= random_bits(11) < 2**11 for _ in range(1_000))


def _next_bits(queue: multiprocessing.Queue[int]) -> None:
    queue.put(random_bits(64))


def test_a_forked_child_does_not_repeat_its_parents_random_bits() -> None:
    random_bits(64)  # the parent's page is filled and partly used
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[int] = context.Queue()
    child = context.Process(target=_next_bits, args=(queue,))
    child.start()
    childs = queue.get(timeout=10)
    child.join(timeout=10)
    # Without the fork hook the child would draw exactly the parent's next word.
    assert childs != random_bits(64)
