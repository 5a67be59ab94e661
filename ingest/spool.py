"""A local append-only spool that keeps accepted events durable while Redis is down or too slow.

Layout: ``directory/slot-N/`` belongs to one ingress process at a time, by an exclusive ``flock``
on ``slot-N/lock``; a restarted process re-claims the first free slot and finds what its
predecessor left. A slot holds numbered segments ``seg-<seq>.log`` and, per segment, its committed
drain offset in ``seg-<seq>.off`` (ASCII bytes, replaced atomically). Each record is one frame::

    b"CHS1" | length u32 | crc32 u32 over (length, payload) | payload
    payload = len(dedup_key) u32 | len(event_id) u32 | len(message) u32 | the three fields

all big-endian, strings UTF-8. Appends are group-committed: whatever is pending when the single
writer thread gets free goes out in one write and one fsync. Delivery is at-least-once and in
order; Redis-side dedup makes a re-sent record harmless.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import struct
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from ingest.publisher import Outgoing

log = logging.getLogger("calhook.ingest.spool")

Sink = Callable[[list[Outgoing]], Awaitable[None]]
P = ParamSpec("P")
T = TypeVar("T")

_MAGIC = b"CHS1"
_HEADER = struct.Struct(">4sII")
_FIELDS = struct.Struct(">III")
# Far above any body the ingress accepts; a longer length can only be a corrupt header.
_MAX_FRAME_BYTES = 256 * 1024 * 1024
_MAX_SLOTS = 1024
_SEGMENT = re.compile(r"seg-(\d{20})\.log(\.corrupt)?")
_SLOT = re.compile(r"slot-(\d+)")


class SpoolError(Exception):
    """Raised when an event could not be made durable in the spool."""


def _encode(event: Outgoing) -> bytes:
    key, eid, msg = event.dedup_key.encode(), event.event_id.encode(), event.message
    payload = _FIELDS.pack(len(key), len(eid), len(msg)) + key + eid + msg
    length = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "big")))
    return _HEADER.pack(_MAGIC, length, crc) + payload


def _decode(buf: bytes, pos: int) -> tuple[Outgoing, int] | None:
    """The record framed at ``pos`` and the offset after it, or None if no valid frame is there."""
    if len(buf) - pos < _HEADER.size:
        return None
    magic, length, crc = _HEADER.unpack_from(buf, pos)
    start = pos + _HEADER.size
    stop = start + length
    if magic != _MAGIC or length < _FIELDS.size or stop > len(buf):
        return None
    if zlib.crc32(buf[start:stop], zlib.crc32(buf[pos + 4 : pos + 8])) != crc:
        return None
    n_key, n_eid, n_msg = _FIELDS.unpack_from(buf, start)
    if _FIELDS.size + n_key + n_eid + n_msg != length:
        return None
    a = start + _FIELDS.size
    b, c = a + n_key, a + n_key + n_eid
    try:
        return Outgoing(buf[a:b].decode(), buf[b:c].decode(), bytes(buf[c:stop])), stop
    except UnicodeDecodeError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Segment:
    seq: int
    path: Path
    end: int = 0  # bytes known valid and durable; a reader never goes past it
    drained: int = 0  # offset up to which the sink has taken the records
    pending: int = 0  # records between drained and end
    corrupt: bool = False  # a bad frame sits at ``end``: quarantine once drained up to it

    @property
    def offset_path(self) -> Path:
        return self.path.with_suffix(".off")


def _try_lock(slot: Path) -> int | None:
    """Lock ``slot`` (creating it) and return the lock's fd, or None when another holder has it."""
    slot.mkdir(exist_ok=True)
    fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            return None
        raise
    return fd


def _slots_with_segments(directory: Path) -> list[Path]:
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := _SLOT.fullmatch(p.name))]
    return [p for _, p in sorted(found) if p.is_dir() and any(p.glob("seg-*.log"))]


def _read_offset(seg: _Segment, size: int) -> int:
    text = seg.offset_path.read_text() if seg.offset_path.exists() else "0"
    if text.strip().isdigit() and int(text) <= size:
        return int(text)
    # Offering the segment again from its start is safe: Redis dedups the repeats.
    log.error("unusable drain offset, replaying segment", extra={"segment": str(seg.path)})
    return 0


def _recover_segment(seg: _Segment, sync: bool) -> _Segment:
    data = seg.path.read_bytes()
    seg.drained = pos = _read_offset(seg, len(data))
    while (frame := _decode(data, pos)) is not None:
        pos = frame[1]
        seg.pending += 1
    seg.end = pos
    if pos == len(data):
        return seg
    later = data.find(_MAGIC, pos + 1)
    while later != -1 and _decode(data, later) is None:
        later = data.find(_MAGIC, later + 1)
    if later != -1:
        # Valid frames follow the bad one, so this is damage, not an interrupted write: never
        # skip it silently. Records before it are drained, then the file is moved aside.
        seg.corrupt = True
        log.error("corrupt spool frame", extra={"segment": str(seg.path), "offset": pos})
        return seg
    # A torn tail: a write cut short by a crash, never acknowledged, so it is dropped.
    log.warning(
        "dropping torn spool tail",
        extra={"segment": str(seg.path), "dropped_bytes": len(data) - pos},
    )
    with seg.path.open("r+b") as f:
        f.truncate(pos)
        if sync:
            os.fsync(f.fileno())
    return seg


def _recover(slot: Path, sync: bool) -> tuple[list[_Segment], int]:
    """The slot's segments, oldest first, and the next free sequence number."""
    live: list[int] = []
    top = 0
    for entry in slot.iterdir():
        if entry.name.endswith(".tmp"):  # an offset commit cut short; its old file still holds
            entry.unlink()
        elif m := _SEGMENT.fullmatch(entry.name):
            top = max(top, int(m[1]))  # .corrupt names count too, so none is ever reused
            if not m[2]:
                live.append(int(m[1]))
    for entry in slot.glob("seg-*.off"):
        if not entry.with_suffix(".log").exists():
            entry.unlink()
    segments = [_recover_segment(_Segment(s, slot / _segment_name(s)), sync) for s in sorted(live)]
    return segments, top + 1


def _segment_name(seq: int) -> str:
    return f"seg-{seq:020d}.log"


def _read_frames(path: Path, start: int, end: int, limit: int) -> tuple[list[Outgoing], int]:
    """Up to ``limit`` records from ``start``, never past ``end``; stops early at a bad frame."""
    records: list[Outgoing] = []
    pos = start
    with path.open("rb") as f:
        f.seek(start)
        while pos < end and len(records) < limit:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            length = _HEADER.unpack(header)[1]
            if length > _MAX_FRAME_BYTES or pos + _HEADER.size + length > end:
                break
            frame = _decode(header + f.read(length), 0)
            if frame is None:
                break
            records.append(frame[0])
            pos += frame[1]
    return records, pos


async def _io(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except OSError as exc:
        raise SpoolError(f"spool I/O failed: {exc!r}") from exc


class Spool:
    """One process's slot of the spool; see the module docstring.

    All methods must be called from one event loop; the spool is not thread-safe. ``fsyncs`` counts
    the fsync calls made on the append path, ``batches`` the group commits.
    """

    def __init__(
        self, directory: Path, *, segment_max_bytes: int = 64 * 1024 * 1024, fsync: bool = True
    ) -> None:
        self._directory = directory
        self._segment_max_bytes = segment_max_bytes
        self._fsync = fsync
        self._slot: Path | None = None
        self._lock_fd: int | None = None
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._next_seq = 1
        self._depth = 0  # records written and not yet drained
        self._writing = 0  # records handed to append() whose write has not ended yet
        self._pending: list[tuple[Outgoing, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()  # held while a write is in flight on the active segment
        self._drain_lock = asyncio.Lock()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._fd: int | None = None  # the writer thread's fd; only that thread touches it
        self._fd_seq: int | None = None
        self.fsyncs = 0
        self.batches = 0
        self.largest_batch = 0

    @property
    def slot(self) -> Path:
        """The slot directory this spool owns (or last owned)."""
        if self._slot is None:
            raise SpoolError("the spool is not open")
        return self._slot

    def depth(self) -> int:
        """Records appended and not yet drained, in this spool's own slot.

        An append still being written and fsynced counts from the moment append() is called: a
        caller that sees 0 knows no record can turn up later ahead of what it writes elsewhere.
        """
        return self._depth + self._writing

    async def open(self) -> None:
        """Claim the first free slot, recover its segments and start the writer."""
        if self._lock_fd is not None:
            raise SpoolError("the spool is already open")
        slot, fd = await _io(self._claim)
        await self._start(slot, fd)

    def _claim(self) -> tuple[Path, int]:
        self._directory.mkdir(parents=True, exist_ok=True)
        for index in range(_MAX_SLOTS):
            slot = self._directory / f"slot-{index}"
            fd = _try_lock(slot)
            if fd is not None:
                if self._fsync:  # the slot's own name must survive a crash too
                    _fsync_dir(self._directory)
                return slot, fd
        raise SpoolError(f"all {_MAX_SLOTS} spool slots in {self._directory} are locked")

    async def _start(self, slot: Path, fd: int) -> None:
        try:
            self._segments, self._next_seq = await _io(_recover, slot, self._fsync)
        except BaseException:
            os.close(fd)  # closing the only fd on the lock file releases the flock
            raise
        self._slot, self._lock_fd = slot, fd
        # Appends always start a fresh segment: recovered ones are only drained, never extended.
        self._active = None
        self._closing = False
        self._depth = sum(s.pending for s in self._segments)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calhook-spool")
        self._flusher = asyncio.create_task(self._run(), name="calhook-spool")
        if self._depth:
            log.info("spool recovered", extra={"slot": str(slot), "records": self._depth})

    async def append(self, event: Outgoing) -> None:
        """Return once ``event`` is written and fsynced; raise SpoolError if it could not be."""
        if self._lock_fd is None or self._closing:
            raise SpoolError("the spool is not open")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Counted before the first await (see depth()); the record is written even if the
        # caller stops waiting, so the count follows the record, not the caller.
        self._writing += 1
        self._pending.append((event, future))
        self._wake.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                await self._commit(batch)
            if self._closing:
                return

    async def _commit(self, batch: list[tuple[Outgoing, asyncio.Future[None]]]) -> None:
        assert self._writer is not None
        assert self._slot is not None
        loop = asyncio.get_running_loop()
        async with self._write_lock:
            seg = self._active
            if seg is None or seg.end >= self._segment_max_bytes:
                seg = _Segment(self._next_seq, self._slot / _segment_name(self._next_seq))
                self._next_seq += 1
                self._segments.append(seg)
                self._active = seg
            events = [event for event, _ in batch]
            try:
                written = await loop.run_in_executor(
                    self._writer, self._write_sync, seg, seg.end, events
                )
            except Exception as exc:
                # What the failed write left behind is unknown: later appends go to a new segment
                # and readers stop at this one's last known good end.
                self._active = None
                self._writing -= len(batch)
                log.error("spool write failed", extra={"records": len(batch), "error": repr(exc)})
                for _, future in batch:
                    if not future.done():
                        future.set_exception(SpoolError(f"spool write failed: {exc!r}"))
                return
            seg.end += written
            seg.pending += len(batch)
            self._depth += len(batch)
            self._writing -= len(batch)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    def _write_sync(self, seg: _Segment, start: int, events: list[Outgoing]) -> int:
        data = b"".join(map(_encode, events))
        try:
            if self._fd is None or self._fd_seq != seg.seq:
                self._close_fd()
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                self._fd = os.open(seg.path, flags, 0o600)
                self._fd_seq = seg.seq
                if self._fsync:  # a new segment's name must be as durable as its bytes
                    _fsync_dir(seg.path.parent)
                    self.fsyncs += 1
            view = memoryview(data)
            pos = start
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
            if self._fsync:
                os.fsync(self._fd)
                self.fsyncs += 1
        except BaseException:
            self._close_fd()
            raise
        return len(data)

    def _close_fd(self) -> None:
        fd, self._fd, self._fd_seq = self._fd, None, None
        if fd is not None:
            os.close(fd)

    async def drain(self, sink: Sink, *, batch_max: int = 256) -> int:
        """Hand spooled records, oldest first, to ``sink`` in batches until the slot is empty.

        A batch's progress is committed only after ``sink`` returns; if it raises, draining stops,
        the error propagates, and that batch is offered again next time. Returns records drained.
        """
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if self._lock_fd is None:
            raise SpoolError("the spool is not open")
        total = 0
        async with self._drain_lock:
            while self._segments and not self._closing:
                seg = self._segments[0]
                if seg.drained < seg.end:
                    records, pos = await _io(
                        _read_frames, seg.path, seg.drained, seg.end, batch_max
                    )
                    if not records:
                        await self._quarantine(seg)
                        continue
                    await sink(records)
                    # A finished, rolled segment is deleted next; its offset need not be written.
                    if pos < seg.end or seg is self._active:
                        await _io(self._commit_offset, seg, pos)
                    seg.drained = pos
                    seg.pending -= len(records)
                    self._depth -= len(records)
                    total += len(records)
                elif seg is self._active:
                    if seg.end == 0:
                        break
                    await self._roll(seg)
                elif seg.corrupt:
                    await self._quarantine(seg)
                else:
                    await _io(self._remove_sync, seg)
                    self._segments.remove(seg)
        return total

    async def _roll(self, seg: _Segment) -> None:
        """Send new appends to a new segment, so a fully drained ``seg`` can be deleted."""
        assert self._writer is not None
        async with self._write_lock:
            if self._active is seg:
                self._active = None
                await asyncio.get_running_loop().run_in_executor(self._writer, self._close_fd)

    def _commit_offset(self, seg: _Segment, offset: int) -> None:
        tmp = seg.path.with_name(seg.offset_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{offset}\n".encode())
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(seg.offset_path)
        if self._fsync:
            _fsync_dir(seg.path.parent)

    def _remove_sync(self, seg: _Segment, rename_to: Path | None = None) -> None:
        if rename_to is None:
            seg.path.unlink(missing_ok=True)
        else:
            seg.path.replace(rename_to)
        seg.offset_path.unlink(missing_ok=True)
        if self._fsync:
            _fsync_dir(seg.path.parent)

    async def _quarantine(self, seg: _Segment) -> None:
        await self._roll(seg)
        target = seg.path.with_name(seg.path.name + ".corrupt")
        await _io(self._remove_sync, seg, target)
        self._segments.remove(seg)
        self._depth -= seg.pending
        log.error(
            "spool segment moved aside as corrupt; records after the damage need manual replay",
            extra={"segment": str(target), "offset": seg.drained, "records_known": seg.pending},
        )

    async def drain_orphans(self, sink: Sink, *, batch_max: int = 256) -> int:
        """Drain other slots whose owner is gone (their lock is free); return records drained."""
        if self._lock_fd is None:
            raise SpoolError("the spool is not open")
        own = self.slot
        total = 0
        for slot in await _io(_slots_with_segments, self._directory):
            if slot == own:
                continue
            fd = await _io(_try_lock, slot)
            if fd is None:  # a live process owns it and drains it itself
                continue
            other = Spool(
                self._directory, segment_max_bytes=self._segment_max_bytes, fsync=self._fsync
            )
            await other._start(slot, fd)
            try:
                drained = await other.drain(sink, batch_max=batch_max)
            finally:
                await other.close()
            log.info("drained orphaned spool slot", extra={"slot": str(slot), "records": drained})
            total += drained
        return total

    async def close(self) -> None:
        """Write what is pending, let a running drain finish its batch, stop, release the slot."""
        if self._lock_fd is None or self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
            self._flusher = None
        async with self._drain_lock:
            pass
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._close_fd)
            await asyncio.to_thread(self._writer.shutdown)
            self._writer = None
        fd, self._lock_fd = self._lock_fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
