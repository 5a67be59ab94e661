"""Sortable event ids (UUIDv7, RFC 9562), so ids order by arrival in logs and in Redis.

Their random bits come from the operating system's CSPRNG, read a page at a time: one
``getrandom`` call per 512 ids instead of two per id, which showed in the ingress's profile.
"""

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_pool = b""
_pos = 0
_POOL_BYTES = 4096


def random_bits(n: int) -> int:
    """``n`` (at most 64) random bits from the OS's CSPRNG, drawn from a buffered page."""
    with _lock:
        return _take(n)


def random_uuid4() -> uuid.UUID:
    """A version 4 UUID, as :func:`uuid.uuid4` makes, from the buffered page."""
    with _lock:
        value = (_take(64) << 64) | _take(64)
    return uuid.UUID(int=value, version=4)


def _take(n: int) -> int:
    # The caller holds _lock.
    global _pool, _pos
    if _pos + 8 > len(_pool):
        _pool, _pos = os.urandom(_POOL_BYTES), 0
    word = int.from_bytes(_pool[_pos : _pos + 8], "big")
    _pos += 8
    return word >> (64 - n)


def _forget_pool() -> None:
    # A forked child (a prefork worker) must never draw its parent's remaining bytes.
    global _pool, _pos, _lock
    _pool, _pos, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)

_COUNTER_BITS = 12
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1


def new_event_id() -> str:
    """Return a new UUIDv7 as a string; ids made in one process increase strictly."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            # Start the counter low and random (RFC 9562, method 1) to leave room to count.
            _counter = _take(_COUNTER_BITS - 1)
        elif _counter < _COUNTER_MAX:
            _counter += 1
        else:
            # More than 2048 ids in one millisecond: borrow the next millisecond.
            _last_ms += 1
            _counter = 0
        ms, counter = _last_ms, _counter
        tail = _take(62)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= tail
    return str(uuid.UUID(int=value))
