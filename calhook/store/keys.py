"""Every Redis key calhook uses, declared once: Python imports these, Lua gets the same names.

The Lua scripts (``lua/*.lua``) receive this layout as a table ``K`` rendered from :data:`LUA_KEYS`
when they are loaded (:mod:`calhook.store.scripts`), so a key name lives here and nowhere else.

One event, two keys: ``ev:<id>`` is a small hash holding the event's metadata and the state of
each of its pairs (the dispatch and one per handler), ``body:<id>`` the raw body. The body leaves
Redis when every pair is final, unless a dead letter or a parked record still needs it.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "calhook:"

# Queues and task names calhook itself uses; handlers name their own queues.
DISPATCH_QUEUE: Final = "dispatch"
AUDIT_QUEUE: Final = "audit"
DISPATCH_TASK: Final = "calhook.dispatch"
# One task name for every handler (the handler is an argument): a worker that does not know a
# handler still accepts the message and dead-letters it, where Celery would discard a task name
# it does not know.
HANDLER_TASK: Final = "calhook.handle"
# The pair name of an event's dispatch; '@' cannot start a handler's name.
DISPATCH_PAIR: Final = "@dispatch"

# Per event.
EVENT: Final = f"{PREFIX}ev:"
BODY: Final = f"{PREFIX}body:"
TRAIL: Final = f"{PREFIX}trail:"
DEDUP: Final = f"{PREFIX}dedup:"
# Fleet-wide.
DUE: Final = f"{PREFIX}due"  # sorted set: "<event id>/<pair>" by when the sweep looks at it
SEQ: Final = f"{PREFIX}seq"  # hash: queue -> messages calhook pushed onto it
TAKEN: Final = f"{PREFIX}taken"  # hash: queue -> highest push number a worker has taken
PAIRS: Final = f"{PREFIX}pairs:"  # hashes pairs:<state>: queue -> pairs in that state
TRAIL_INDEX: Final = f"{PREFIX}events"
DEAD: Final = f"{PREFIX}dead"  # index; records are dead:<event id>.<handler>
PARKED: Final = f"{PREFIX}parked"  # index; records are parked:<event id>
ORDER: Final = f"{PREFIX}order:"  # order:<scope>:<entity> applied version, its :lock
STATS_OUTCOMES: Final = f"{PREFIX}stats:outcomes"
STATS_DURATION: Final = f"{PREFIX}stats:duration:"
RECENT_FAILURES: Final = f"{PREFIX}stats:recent_failures"
# Batches the ingress wrote under a confirmed acknowledgement (ingest/acks.py): accept.lua
# writes here, so the WAITAOF/WAIT after it covers everything written before, a retry's included.
CONFIRMED: Final = f"{PREFIX}ingest:confirmed"
THROUGHPUT: Final = f"{PREFIX}throughput:"
RATELIMIT: Final = f"{PREFIX}ratelimit:"  # ratelimit:<destination> token bucket
# A handler held by an operator or its breaker, and what happens while it is (store/health.py).
HOLD: Final = f"{PREFIX}hold"  # hash: handler -> "operator" or "breaker:<circuit>"
PAUSE: Final = f"{PREFIX}pause:"  # pause:<handler>: why an operator paused it
HELD: Final = f"{PREFIX}held:"  # held:<handler>: its held events by when they were received
HOLDING: Final = f"{PREFIX}holding"  # set: handlers with held events
RELEASED: Final = f"{PREFIX}released"  # hash: handler -> when its release was last paced (ms)
RELEASE_RATE: Final = f"{PREFIX}release_rate"  # hash: handler -> events/s chosen at resume
BREAKER: Final = f"{PREFIX}breaker:"  # breaker:<circuit>: its state
BREAKERS: Final = f"{PREFIX}breakers"  # set: circuits open or probing
RECOVERING: Final = f"{PREFIX}recovering"  # hash: handler -> circuit; its next success counts
FAILURE_GROUPS: Final = f"{PREFIX}fgroups"  # sorted set: group id by last seen (s)
FAILURE_GROUP: Final = f"{PREFIX}fgroup:"  # fgroup:<id>: one group; fgroup:open:<handler> set
NOTICES: Final = f"{PREFIX}notices"  # stream of operational transitions (workers/notices.py)
NOTICES_MAX: Final = 10_000  # about this many entries are kept (XADD MAXLEN ~)
# Whether the dead letters were last told above or below CALHOOK_NOTICE_DEAD_LETTERS.
NOTICES_DEAD_LETTERS: Final = f"{NOTICES}:dead_letters"
ROUTES: Final = f"{PREFIX}routes"  # sorted set: worker -> when it last published its routes
ROUTE: Final = f"{PREFIX}route:"  # route:<worker>: what it serves (workers/routes.py)
NOTIFY: Final = f"{PREFIX}notify:"  # notify:sent:<pair key> e-mail marks, notify:posted:<pair key>
# What calhook 0.1 kept, read once on upgrade (workers/legacy.py).
LEGACY_DELAYED: Final = f"{PREFIX}delayed"
LEGACY_DELAYED_MESSAGES: Final = f"{PREFIX}delayed:messages"
LEGACY_WATCHDOG: Final = f"{PREFIX}watchdog"
LEGACY_WATCHDOG_MESSAGES: Final = f"{PREFIX}watchdog:messages"
LEGACY_LEDGER: Final = f"{PREFIX}ledger:"
# kombu's Redis transport: messages a worker took and has not acked, keyed by delivery tag.
UNACKED: Final = "unacked"
UNACKED_INDEX: Final = "unacked_index"

# Pair states. Final ones never change again, except by an operator's replay.
QUEUED: Final = "queued"
RUNNING: Final = "running"
WAITING: Final = "waiting"
HELD_STATE: Final = "held"
DONE: Final = "done"
STALE: Final = "stale"
DEAD_STATE: Final = "dead"
PARKED_STATE: Final = "parked"
FINAL_STATES: Final = frozenset({DONE, STALE, DEAD_STATE, PARKED_STATE})
OPEN_STATES: Final = (QUEUED, RUNNING, WAITING, HELD_STATE)

LUA_KEYS: Final = {
    "confirmed": CONFIRMED,
    "ev": EVENT,
    "body": BODY,
    "trail": TRAIL,
    "trail_index": TRAIL_INDEX,
    "due": DUE,
    "seq": SEQ,
    "taken": TAKEN,
    "pairs": PAIRS,
    "dead": DEAD,
    "parked": PARKED,
    "order": ORDER,
    "outcomes": STATS_OUTCOMES,
    "duration": STATS_DURATION,
    "failures": RECENT_FAILURES,
    "unacked": UNACKED,
    "hold": HOLD,
    "held": HELD,
    "holding": HOLDING,
    "released": RELEASED,
    "release_rate": RELEASE_RATE,
    "pause": PAUSE,
    "breaker": BREAKER,
    "breakers": BREAKERS,
    "recovering": RECOVERING,
    "fgroups": FAILURE_GROUPS,
    "fgroup": FAILURE_GROUP,
    "notices": NOTICES,
    "unacked_index": UNACKED_INDEX,
    "dispatch_pair": DISPATCH_PAIR,
    "dispatch_queue": DISPATCH_QUEUE,
    "dispatch_task": DISPATCH_TASK,
    "handler_task": HANDLER_TASK,
}


def event_key(event_id: str) -> str:
    """The hash of one event's metadata and pair states."""
    return f"{EVENT}{event_id}"


def body_key(event_id: str) -> str:
    """The raw body of one event, while some pair or record needs it."""
    return f"{BODY}{event_id}"


def trail_key(event_id: str) -> str:
    """The list of one event's story (``calhook events show``)."""
    return f"{TRAIL}{event_id}"


def dedup_key(digest_hex: str) -> str:
    """Remembers the first event_id given to a body."""
    return f"{DEDUP}{digest_hex}"


def pair_id(event_id: str, handler: str) -> str:
    """The id of one (event, handler): its dead letter's id, and what people type."""
    return f"{event_id}.{handler}"


def due_member(event_id: str, pair: str) -> str:
    """A pair's member in the sweep's sorted set."""
    return f"{event_id}/{pair}"


def record_key(index: str, record_id: str) -> str:
    """A dead-letter (``index=DEAD``) or parked (``index=PARKED``) record."""
    return f"{index}:{record_id}"


def order_key(scope: str, entity: str) -> str:
    """The version last applied to ``entity`` by the handlers of ``scope``."""
    return f"{ORDER}{scope}:{entity}"


def throughput_key(queue: str, bucket: int) -> str:
    """Work finished on ``queue`` in one 10-second bucket."""
    return f"{THROUGHPUT}{queue}:{bucket}"


def duration_key(handler: str) -> str:
    """One handler's duration histogram."""
    return f"{STATS_DURATION}{handler}"


def pairs_key(state: str) -> str:
    """How many pairs are in ``state``, per queue."""
    return f"{PAIRS}{state}"
