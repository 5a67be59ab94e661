"""Sortable event ids (UUIDv7, RFC 9562), so ids order by arrival in logs and in Redis."""

import secrets
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0

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
            _counter = secrets.randbits(_COUNTER_BITS - 1)
        elif _counter < _COUNTER_MAX:
            _counter += 1
        else:
            # More than 2048 ids in one millisecond: borrow the next millisecond.
            _last_ms += 1
            _counter = 0
        ms, counter = _last_ms, _counter
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= secrets.randbits(62)
    return str(uuid.UUID(int=value))
