"""Redis footprint: the bytes one event costs while it is queued and once it is finished, by
kind of key, and the Redis memory a day of 1,000,000 events needs under the default retention.

On a fresh Redis, N copies of one ~2.5 KB fixture (each made unique) go through the real
ingress with no worker running; ``used_memory`` after, less before, over N is the cost of a
queued event. Then a worker host (the no-op handler) drains them until every pair is final, and
the same is measured again: what an event leaves behind. Every key is then sized with ``MEMORY
USAGE`` and put in a kind by its name (calhook/store/keys.py); what ``used_memory`` holds beyond
the keys' sizes (the expiry table, the allocator's rounding) is Redis's own share.

What a server allocates once, on the first use of each script and connection (about 200 KB,
which would be 100 B an event at N = 2,000), is not an event's: a short warm-up cycle of the same
kind runs first and is flushed, and the ingress and the workers are stopped before each reading,
so neither their clients' buffers count.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.e2e import _env, _ingress, _post, _wait_done, _workers, wait_consuming
from bench.fixtures import Body, fixture_bodies
from bench.loadgen import write_bodies
from calhook.redis_server import RedisServer
from calhook.settings import Settings
from calhook.store.keys import (
    BODY,
    DEDUP,
    DISPATCH_QUEUE,
    DUE,
    EVENT,
    OPEN_STATES,
    PAIRS,
    PREFIX,
    SEQ,
    TAKEN,
    THROUGHPUT,
    TRAIL,
    TRAIL_INDEX,
    UNACKED,
    UNACKED_INDEX,
    event_key,
    pairs_key,
)

FIXTURE_BYTES = 2500
POST_RATE = 2000
WARM_UP_EVENTS = 50
DAY_S = 86_400
EVENTS_PER_DAY = 1_000_000

# The kinds of key, in the order the report lists them; "counters" and "other" do not grow
# with the number of events.
KINDS = ("body", "state", "dedup", "messages", "due", "trail", "trail index", "counters", "other")
PER_EVENT = KINDS[:-2]
KEYS_OF_KIND = {
    "body": f"`{BODY}<id>`",
    "state": f"`{EVENT}<id>` (metadata, each pair's state)",
    "dedup": f"`{DEDUP}<sha256>`",
    "messages": f"Celery's queue lists (`{DISPATCH_QUEUE}`, the handler's), `{UNACKED}`",
    "due": f"a member of `{DUE}`",
    "trail": f"`{TRAIL}<id>`",
    "trail index": f"a member of `{TRAIL_INDEX}`",
    "counters": f"`{SEQ}`, `{TAKEN}`, `{PAIRS}*`, `{PREFIX}stats:*`, `{THROUGHPUT}*`",
    "other": "kombu's bindings, the benchmark's counter",
}


def kind_of(key: str, redis_type: str) -> str:
    """The kind of a key, by the names of calhook/store/keys.py."""
    for prefix, kind in ((BODY, "body"), (EVENT, "state"), (DEDUP, "dedup"), (TRAIL, "trail")):
        if key.startswith(prefix):
            return kind
    if key == TRAIL_INDEX:
        return "trail index"
    if key == DUE:
        return "due"
    if key.startswith(PREFIX):
        return "counters"  # queue counts, pair counts, outcome and duration stats, throughput
    if redis_type == "list" or key in (UNACKED, UNACKED_INDEX):
        return "messages"  # a Celery queue (named by the queue), or kombu's unacked messages
    return "other"  # kombu's bindings, the benchmark's own counter


def fixture() -> Body:
    """The fixture of a current type whose size is nearest to 2.5 KB."""
    return min(fixture_bodies(), key=lambda b: abs(b.size - FIXTURE_BYTES))


def snapshot(client: redis.Redis, used: int, events: int) -> dict[str, Any]:
    """``used`` bytes of ``used_memory`` and each kind's keys and bytes (``MEMORY USAGE``), each
    also over ``events``."""
    keys = list(client.scan_iter(count=1000))
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.memory_usage(key, samples=0)
        answers = pipe.execute()
    kinds: dict[str, dict[str, float]] = {k: {"keys": 0, "bytes": 0} for k in KINDS}
    for key, redis_type, size in zip(keys, answers[::2], answers[1::2], strict=True):
        kind = kinds[kind_of(key.decode(), redis_type.decode())]
        kind["keys"] += 1
        kind["bytes"] += size or 0
    sized = sum(k["bytes"] for k in kinds.values())
    return {
        "used_bytes": used,
        "per_event": used / events,
        "kinds": {
            name: {"keys": k["keys"], "bytes": k["bytes"], "per_event": k["bytes"] / events}
            for name, k in kinds.items()
        },
        "redis_own_per_event": (used - sized) / events,
    }


def lifetimes(settings: Settings) -> dict[str, tuple[float, str]]:
    """How long each kind of a finished event's keys lives, and the setting that says so."""
    return {
        "state": (settings.ledger_ttl_s, "CALHOOK_LEDGER_TTL_S"),
        "dedup": (settings.dedup_ttl_s, "CALHOOK_DEDUP_TTL_S"),
        "trail": (settings.trail_keep_s, "CALHOOK_TRAIL_TTL_S, at most the retention"),
        # The scheduler trims the index to the trails' age (calhook/store/trail.py).
        "trail index": (settings.trail_keep_s, "as the trails"),
    }


def day(finished: dict[str, Any], queued: dict[str, Any]) -> dict[str, Any]:
    """The Redis memory of 1,000,000 events a day under the default settings: each kind of key
    held for its lifetime, ``bytes × events/s × lifetime``; after the first day (each kind
    capped at a day) and at the steady state. Redis's own share grows with the keys' bytes."""
    settings = Settings.model_construct()  # the defaults, whatever this environment says
    rate = EVENTS_PER_DAY / DAY_S
    rows = []
    for kind, (life_s, setting) in lifetimes(settings).items():
        per_event = finished["kinds"][kind]["per_event"]
        first_day = per_event * rate * min(life_s, DAY_S)
        steady = per_event * rate * life_s
        rows.append(
            {
                "kind": kind,
                "per_event": per_event,
                "life_s": life_s,
                "setting": setting,
                "first_day": first_day,
                "steady": steady,
            }
        )
    sized = sum(finished["kinds"][k]["per_event"] for k in PER_EVENT)
    own = finished["redis_own_per_event"] / sized if sized else 0.0
    first_day_all = sum(r["first_day"] for r in rows)
    steady_all = sum(r["steady"] for r in rows)
    # What is queued for a while: the body, the state, the message and the due entry. With
    # workers keeping up that is a fraction of a second's events; a backlog costs this much.
    backlog_hour = queued["per_event"] * rate * 3600
    return {
        "events_per_day": EVENTS_PER_DAY,
        "rows": rows,
        "redis_own_share": own,
        "first_day": first_day_all * (1 + own),
        "steady": steady_all * (1 + own),
        "backlog_hour": backlog_hour,
    }


def _open_pairs(client: redis.Redis) -> int:
    total = 0
    for state in OPEN_STATES:
        counts: dict[bytes, bytes] = client.hgetall(pairs_key(state))  # type: ignore[assignment]
        total += sum(int(v) for v in counts.values())
    return total


def _wait_final(client: redis.Redis, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (open_pairs := _open_pairs(client)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{open_pairs} pairs still open {timeout_s} s after the drain")
        time.sleep(0.05)


def _used_memory(client: redis.Redis) -> int:
    # A large key (a queue, the trail index) may be freed by a background thread after DEL.
    while int(client.info("memory").get("lazyfree_pending_objects", 0)):
        time.sleep(0.01)
    return int(client.info("memory")["used_memory"])


def _queue(env: dict[str, str], work: Path, bodies: Path, events: int) -> dict[str, Any]:
    with _ingress(env, work) as port:
        return _post(port, bodies, POST_RATE, events / POST_RATE, work)


def _drain(
    client: redis.Redis,
    env: dict[str, str],
    work: Path,
    events: int,
    workers: tuple[tuple[str, str, int], ...],
) -> None:
    with _workers(workers, env, work) as children:
        wait_consuming(client, children)
        _wait_done(client, events, children)
        _wait_final(client)


def run(events: int, workers: tuple[tuple[str, str, int], ...], progress: Any) -> dict[str, Any]:
    body = fixture()
    with tempfile.TemporaryDirectory(prefix="calhook-footprint-") as tmp:
        work = Path(tmp)
        bodies = write_bodies([body], work / "bodies")
        with RedisServer(work / "redis") as server:
            client = redis.Redis.from_url(server.url)
            env = _env(server.url, work, "noop", "")
            warm = _queue(env, work, bodies, WARM_UP_EVENTS)
            _drain(client, env, work, int(warm["statuses"].get("202", 0)), workers)
            client.flushall(asynchronous=False)  # the script cache stays
            baseline = _used_memory(client)
            posted = _queue(env, work, bodies, events)
            accepted = int(posted["statuses"].get("202", 0))
            stored: Any = client.hget(event_key(posted["acks"][0][0]), "bytes")
            queued = snapshot(client, _used_memory(client) - baseline, accepted)
            progress(f"footprint queued:   {accepted} events, {queued['per_event']:,.0f} B each")
            _drain(client, env, work, accepted, workers)
            finished = snapshot(client, _used_memory(client) - baseline, accepted)
            progress(f"footprint finished: {finished['per_event']:,.0f} B each")
    return {
        "events": accepted,
        "fixture": body.name,
        "body_bytes": int(stored) if stored else body.size,
        "queued": queued,
        "finished": finished,
        "day": day(finished, queued),
    }
