"""The local spool: durable appends with group commit, ordered at-least-once draining, recovery
after a crash, torn and corrupt segments, one slot per process and orphaned slots."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ingest.publisher import Outgoing
from ingest.spool import Spool, SpoolError

ROOT = Path(__file__).resolve().parents[2]
MakeSpool = Callable[..., Awaitable[Spool]]

# Appends K records in a separate process, then dies without closing anything.
CRASHING_WRITER = """
import asyncio, os, sys
from pathlib import Path
from ingest.publisher import Outgoing
from ingest.spool import Spool

async def main() -> None:
    spool = Spool(Path(sys.argv[1]))
    await spool.open()
    for i in range(int(sys.argv[2])):
        message = b"\\x00\\xff" + str(i).encode()
        await spool.append(Outgoing(f"dedup:{i:04d}", f"evt-{i:04d}", message))
    print(spool.slot, flush=True)
    os._exit(0)

asyncio.run(main())
"""


def event(i: int) -> Outgoing:
    """Distinct records with binary message bodies."""
    return Outgoing(f"dedup:{i:04d}", f"evt-{i:04d}", b"\x00\xff" + str(i).encode())


def segment_files(slot: Path) -> list[Path]:
    return sorted(slot.glob("seg-*"))


class Sink:
    """Records what it is given; raises on the call numbered ``fail_on``, like a Redis outage."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.fail_on = fail_on
        self.calls = 0
        self.batches: list[list[Outgoing]] = []

    async def __call__(self, batch: list[Outgoing]) -> None:
        self.calls += 1
        await asyncio.sleep(0)  # let appends run in between, as a real Redis round trip would
        if self.calls == self.fail_on:
            raise ConnectionError("redis is down")
        self.batches.append(batch)

    @property
    def records(self) -> list[Outgoing]:
        return [record for batch in self.batches for record in batch]


@pytest.fixture
async def make_spool(tmp_path: Path) -> AsyncIterator[MakeSpool]:
    """Open spools (under ``tmp_path/spool`` unless told) and close them all afterwards."""
    opened: list[Spool] = []

    async def make(directory: Path | None = None, **kwargs: Any) -> Spool:
        spool = Spool(directory or tmp_path / "spool", **kwargs)
        await spool.open()
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        await spool.close()


@pytest.mark.parametrize("segment_max_bytes", [64 * 1024 * 1024, 200])
async def test_drain_delivers_everything_in_order_then_deletes_segments(
    make_spool: MakeSpool, segment_max_bytes: int
) -> None:
    spool = await make_spool(segment_max_bytes=segment_max_bytes)
    for i in range(50):
        await spool.append(event(i))
    assert spool.depth() == 50
    logs = list(spool.slot.glob("seg-*.log"))
    assert len(logs) == 1 if segment_max_bytes > 1000 else len(logs) > 5

    sink = Sink()
    assert await spool.drain(sink, batch_max=16) == 50

    assert sink.records == [event(i) for i in range(50)]
    assert all(1 <= len(batch) <= 16 for batch in sink.batches)
    assert spool.depth() == 0
    assert segment_files(spool.slot) == []
    assert await spool.drain(sink) == 0


async def test_concurrent_appends_share_fsyncs_and_land_in_completion_order(
    make_spool: MakeSpool, tmp_path: Path
) -> None:
    spool = await make_spool()
    completed: list[int] = []

    async def append(i: int) -> None:
        await spool.append(event(i))
        completed.append(i)

    await asyncio.gather(*(append(i) for i in range(200)))

    assert sorted(completed) == list(range(200))
    assert spool.depth() == 200
    assert 0 < spool.fsyncs < 200
    assert spool.batches < 200
    await spool.close()

    # Durable: a new spool on the directory re-claims the slot and finds every record.
    again = await make_spool()
    assert again.slot == spool.slot
    assert again.depth() == 200
    sink = Sink()
    assert await again.drain(sink) == 200
    assert sink.records == [event(i) for i in completed]


async def test_a_failing_sink_repeats_only_its_own_batch(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    for i in range(10):
        await spool.append(event(i))

    failing = Sink(fail_on=2)
    with pytest.raises(ConnectionError):
        await spool.drain(failing, batch_max=3)
    assert failing.records == [event(i) for i in range(3)]
    assert spool.depth() == 7

    # The committed offset is on disk: a restart does not offer the first batch again either.
    await spool.close()
    again = await make_spool()
    assert again.depth() == 7
    sink = Sink()
    assert await again.drain(sink, batch_max=3) == 7
    assert sink.records == [event(i) for i in range(3, 10)]
    assert again.depth() == 0


async def test_a_crashed_writers_records_are_recovered(
    make_spool: MakeSpool, tmp_path: Path
) -> None:
    directory = tmp_path / "spool"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_WRITER,
        str(directory),
        "25",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0
    assert segment_files(directory / "slot-0") != []

    spool = await make_spool(directory)
    assert spool.slot == Path(out.decode().strip())
    assert spool.depth() == 25
    sink = Sink()
    assert await spool.drain(sink) == 25
    assert sink.records == [event(i) for i in range(25)]


@pytest.mark.parametrize("tail", ["half_frame", "garbage"])
async def test_a_torn_tail_is_dropped_and_earlier_records_kept(
    make_spool: MakeSpool, tail: str
) -> None:
    spool = await make_spool()
    for i in range(5):
        await spool.append(event(i))
    await spool.close()
    [segment] = spool.slot.glob("seg-*.log")
    intact = segment.read_bytes()
    frame = len(intact) // 5  # all five frames have the same size
    torn = intact[: frame // 2] if tail == "half_frame" else b"\x00\x13garbage"
    segment.write_bytes(intact + torn)

    again = await make_spool()
    assert again.depth() == 5
    assert segment.read_bytes() == intact
    await again.append(event(5))
    sink = Sink()
    assert await again.drain(sink) == 6
    assert sink.records == [event(i) for i in range(6)]


async def test_a_corrupt_frame_in_the_middle_moves_the_segment_aside(
    make_spool: MakeSpool, caplog: pytest.LogCaptureFixture
) -> None:
    spool = await make_spool()
    for i in range(3):
        await spool.append(event(i))
    await spool.close()
    [first] = spool.slot.glob("seg-*.log")
    again = await make_spool()
    for i in range(3, 5):  # a reopened spool appends to a new segment
        await again.append(event(i))
    await again.close()
    data = bytearray(first.read_bytes())
    data[len(data) // 3 + 20] ^= 0xFF  # inside the second of three frames
    first.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="calhook.ingest.spool"):
        third = await make_spool()
        assert third.depth() == 3
        sink = Sink()
        assert await third.drain(sink) == 3

    assert sink.records == [event(0), event(3), event(4)]
    assert [p.name for p in segment_files(third.slot)] == [first.name + ".corrupt"]
    assert (third.slot / (first.name + ".corrupt")).read_bytes() == bytes(data)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2  # found on recovery, moved aside when drained
    assert not any("evt-" in r.getMessage() or "dedup:" in r.getMessage() for r in caplog.records)


async def test_spools_claim_separate_slots_and_orphans_are_drained(
    make_spool: MakeSpool,
) -> None:
    first = await make_spool()
    second = await make_spool()
    assert (first.slot.name, second.slot.name) == ("slot-0", "slot-1")
    await first.append(event(100))
    for i in range(3):
        await second.append(event(i))

    sink = Sink()
    assert await first.drain_orphans(sink) == 0  # second is alive and owns its slot
    assert sink.records == []

    await second.close()
    assert await first.drain_orphans(sink) == 3
    assert sink.records == [event(i) for i in range(3)]
    assert segment_files(second.slot) == []
    assert first.depth() == 1  # its own records are left to its own drain

    third = await make_spool()
    assert third.slot == second.slot
    assert third.depth() == 0


async def test_appends_during_a_drain_are_neither_lost_nor_repeated(
    make_spool: MakeSpool,
) -> None:
    spool = await make_spool(segment_max_bytes=512)
    producer_done = asyncio.Event()
    sink = Sink()
    taken_while_producing = 0

    async def produce() -> None:
        for i in range(300):
            await spool.append(event(i))
        producer_done.set()

    async def observing_sink(batch: list[Outgoing]) -> None:
        nonlocal taken_while_producing
        taken_while_producing += 0 if producer_done.is_set() else len(batch)
        await sink(batch)

    producer = asyncio.create_task(produce())
    async with asyncio.timeout(60):
        while not (producer_done.is_set() and spool.depth() == 0):
            await spool.drain(observing_sink, batch_max=10)
            await asyncio.sleep(0)
    await producer

    assert taken_while_producing > 0
    assert sink.records == [event(i) for i in range(300)]
    assert segment_files(spool.slot) == []


async def test_a_directory_that_cannot_be_used_raises_spool_error(
    make_spool: MakeSpool, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(SpoolError):
        await make_spool(not_a_dir)


async def test_an_append_that_cannot_be_written_raises_and_later_appends_recover(
    make_spool: MakeSpool,
) -> None:
    spool = await make_spool()
    # Even root cannot create a segment inside a path that is a regular file.
    shutil.rmtree(spool.slot)
    spool.slot.write_bytes(b"")
    with pytest.raises(SpoolError):
        await spool.append(event(0))
    assert spool.depth() == 0

    spool.slot.unlink()
    spool.slot.mkdir()
    await spool.append(event(1))
    sink = Sink()
    assert await spool.drain(sink) == 1
    assert sink.records == [event(1)]


async def test_a_closed_spool_refuses_appends(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    await spool.append(event(0))
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.append(event(1))
