"""Names and numbers shared by the ingress and the workers; units are in the names.

Redis key names and the queues and tasks calhook uses are declared in :mod:`calhook.store.keys`;
they are repeated here for the modules that only need a name.
"""

from typing import Final

from calhook.store.keys import (
    AUDIT_QUEUE,
    DISPATCH_QUEUE,
    DISPATCH_TASK,
    HANDLER_TASK,
    dedup_key,
    pair_id,
    trail_key,
)
from calhook.store.keys import PREFIX as KEY_PREFIX

__all__ = [
    "AUDIT_QUEUE",
    "DEDUP_TTL_S_DEFAULT",
    "DISPATCH_QUEUE",
    "DISPATCH_TASK",
    "HANDLER_TASK",
    "KEY_PREFIX",
    "dedup_key",
    "pair_id",
    "trail_key",
]

# A retransmission of the same bytes is recognised for at least this long (the issue asks 24 h;
# twice that covers a sender that retries "tomorrow").
DEDUP_TTL_S_DEFAULT: Final = 48 * 3600
