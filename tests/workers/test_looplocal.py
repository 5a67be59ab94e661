"""Objects bound to an event loop: one per loop, made inside it, closed when it shuts down."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import uvloop

from workers.looplocal import LoopLocal


@dataclass
class Thing:
    loop: asyncio.AbstractEventLoop
    closed: bool = False


def things() -> tuple[LoopLocal[Thing], list[Thing]]:
    """A LoopLocal of Things that remember their loop, and the list of every Thing made."""
    made: list[Thing] = []

    def make() -> Thing:
        thing = Thing(asyncio.get_running_loop())
        made.append(thing)
        return thing

    async def close(thing: Thing) -> None:
        await asyncio.sleep(0)  # closing may await (aiohttp's session.close does)
        thing.closed = True

    return LoopLocal(make, close), made


async def test_one_object_per_loop_made_inside_it() -> None:
    local, made = things()

    first, again = await local.get(), await local.get()
    other = await asyncio.to_thread(asyncio.run, local.get())

    assert first is again
    assert first.loop is asyncio.get_running_loop()
    assert other is not first
    assert other.loop is not first.loop
    assert made == [first, other]


def test_the_object_is_closed_when_its_loop_shuts_down() -> None:
    local, made = things()

    asyncio.run(local.get())
    uvloop.run(local.get())

    assert [t.closed for t in made] == [True, True]


async def test_aclose_closes_now_and_the_next_get_makes_a_new_one() -> None:
    local, _ = things()
    first = await local.get()

    await local.aclose()
    second = await local.get()

    assert first.closed
    assert second is not first
    assert not second.closed
    await local.aclose()
    await local.aclose()  # nothing left to close: no error
    assert second.closed


def test_a_loop_that_runs_on_keeps_its_object() -> None:
    # Given a loop run by a thread of its own, as workers/loop.py runs the process's loop
    local, _ = things()
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        first = asyncio.run_coroutine_threadsafe(local.get(), loop).result(timeout=5)
        second = asyncio.run_coroutine_threadsafe(local.get(), loop).result(timeout=5)

        assert first is second
        assert not first.closed
    finally:
        asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
    assert first.closed
