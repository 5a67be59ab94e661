"""Names and numbers shared by the ingress and the workers; units are in the names."""

from typing import Final

KEY_PREFIX: Final = "calhook:"

# Queues. Handlers name their own queue; these are the ones calhook itself uses.
DISPATCH_QUEUE: Final = "dispatch"
AUDIT_QUEUE: Final = "audit"

DISPATCH_TASK: Final = "calhook.dispatch"
# One task name for every handler (the handler is an argument): a worker that does not know a
# handler still accepts the message and dead-letters it, where Celery would discard a task
# name it does not know.
HANDLER_TASK: Final = "calhook.handle"

# A retransmission of the same bytes is recognised for at least this long (the issue asks 24 h;
# twice that covers a sender that retries "tomorrow").
DEDUP_TTL_S_DEFAULT: Final = 48 * 3600
# The fan-out marker only has to outlive the redelivery of one dispatch message.
DISPATCHED_TTL_S: Final = 7 * 24 * 3600


def dedup_key(digest_hex: str) -> str:
    """Redis key remembering the first event_id given to a body."""
    return f"{KEY_PREFIX}dedup:{digest_hex}"


def dispatched_key(event_id: str) -> str:
    """Redis key marking that an event has been fanned out to its handlers."""
    return f"{KEY_PREFIX}dispatched:{event_id}"


# The watchdog: a copy of every queued calhook message, due again unless its work finishes.
WATCHDOG_KEY: Final = f"{KEY_PREFIX}watchdog"
WATCHDOG_MESSAGES_KEY: Final = f"{KEY_PREFIX}watchdog:messages"


def pair_id(event_id: str, handler: str) -> str:
    """The id of one (event, handler): its dead letter, its watchdog entry, its task id."""
    return f"{event_id}.{handler}"


def trail_key(event_id: str) -> str:
    """The list of one event's story (workers/trail.py; the ingress adds "spooled")."""
    return f"{KEY_PREFIX}trail:{event_id}"
