"""Dispatch: validate an accepted event fully, then fan it out, one task per (event, handler).

Events that cannot be routed are parked with the reason, never dropped (DESIGN.md rule 1):
a payload that fails its schema, a type nobody knows, a planned type nobody handles yet, a current
type whose handlers are all switched off. ``calhook parked`` shows them; replay dispatches again.

The fan-out is one Lua script: a marker per event and every handler message, written together.
A dispatch message redelivered after a crash finds the marker and sends nothing twice.
"""

from __future__ import annotations

import enum
import logging
import time
from datetime import tzinfo

import orjson
import redis

from calhook.constants import (
    DISPATCH_QUEUE,
    DISPATCH_TASK,
    DISPATCHED_TTL_S,
    HANDLER_TASK,
    WATCHDOG_KEY,
    WATCHDOG_MESSAGES_KEY,
    dispatched_key,
    pair_id,
)
from calhook.logs import bind
from calhook.messages import Delivery, task_message
from schemas import PLANNED_TYPES, SchemaError, family_of, parse_event
from workers.ledger import Ledger
from workers.queues import count_finished
from workers.registry import Registry
from workers.stores import RecordStore
from workers.trail import Trail
from workers.watchdog import cancel

log = logging.getLogger("calhook.dispatch")

# KEYS[1] the event's marker, KEYS[2] watchdog set, KEYS[3] watchdog messages, KEYS[4..] the
# handlers' queues; ARGV[1] marker ttl, ARGV[2] watchdog due (ms), ARGV[3] the event id, then
# per handler its pair id and its message. The dispatch's own watchdog entry ends here; each
# handler task gets one (workers/watchdog.py).
_FAN_OUT_LUA = """
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[3])
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 4, #KEYS do
  local pair, message = ARGV[2 * i - 4], ARGV[2 * i - 3]
  redis.call('LPUSH', KEYS[i], message)
  redis.call('ZADD', KEYS[2], ARGV[2], pair)
  redis.call('HSET', KEYS[3], pair, KEYS[i] .. '\\n' .. message)
end
return 1
"""


class ParkReason(enum.StrEnum):
    """Why an event was parked instead of dispatched."""

    SCHEMA_INVALID = "schema_invalid"
    UNKNOWN_TYPE = "unknown_type"
    PLANNED_TYPE = "planned_type_without_handler"
    NO_HANDLER = "no_handler"
    POISON = "poison"


def handler_message(
    handler: str, queue: str, delivery: Delivery, event_type: str, attempt: int
) -> bytes:
    """The message of one (event, handler) task; every attempt has the same task id."""
    return task_message(
        HANDLER_TASK,
        queue=queue,
        task_id=pair_id(delivery.event_id, handler),
        root_id=delivery.event_id,
        parent_id=delivery.event_id,
        kwargs={**delivery.task_kwargs(), "handler": handler, "attempt": attempt},
        kwargsrepr=orjson.dumps(
            {
                "event_id": delivery.event_id,
                "type": event_type[:100],
                "handler": handler,
                "attempt": attempt,
            }
        ).decode(),
    )


class Dispatcher:
    """Routes deliveries to handler tasks, or parks them."""

    def __init__(
        self,
        client: redis.Redis,
        registry: Registry,
        parked: RecordStore,
        zone: tzinfo,
        ledger: Ledger,
        max_deliveries: int,
        watchdog_s: float,
        trail: Trail,
    ) -> None:
        self._trail = trail
        self._watchdog_ms = int(watchdog_s * 1000)
        self._redis = client
        self._registry = registry
        self._parked = parked
        self._zone = zone
        self._ledger = ledger
        self._max_deliveries = max_deliveries
        self._fan_out = client.register_script(_FAN_OUT_LUA)

    def dispatch(self, delivery: Delivery) -> list[str]:
        """Fan ``delivery`` out; return the handler names it went to (empty when parked)."""
        deliveries = self._ledger.count_delivery(delivery.event_id, DISPATCH_TASK, 1)
        if deliveries > self._max_deliveries:
            # It failed or killed its worker every time so far: park it for people instead.
            self._park(delivery, None, ParkReason.POISON, [])
            return []
        try:
            event = parse_event(orjson.loads(delivery.body), created_tz=self._zone)
        except (SchemaError, orjson.JSONDecodeError) as exc:
            errors = getattr(exc, "errors", [{"loc": "", "msg": "body is not JSON", "type": ""}])
            self._park(delivery, None, ParkReason.SCHEMA_INVALID, errors)
            return []

        with bind(type=event.type):
            handlers = self._registry.for_type(event.type)
            if not handlers:
                if family_of(event.type) is None:
                    reason = ParkReason.UNKNOWN_TYPE
                elif event.type in PLANNED_TYPES:
                    reason = ParkReason.PLANNED_TYPE
                else:
                    reason = ParkReason.NO_HANDLER
                self._park(delivery, event.type, reason, [])
                return []

            queues = [h.queue for h in handlers]
            messages = [handler_message(h.name, h.queue, delivery, event.type, 1) for h in handlers]
            names = [h.name for h in handlers]
            pairs_and_messages = [
                part
                for h, message in zip(handlers, messages, strict=True)
                for part in (pair_id(delivery.event_id, h.name), message)
            ]
            sent = self._fan_out(
                keys=[
                    dispatched_key(delivery.event_id),
                    WATCHDOG_KEY,
                    WATCHDOG_MESSAGES_KEY,
                    *queues,
                ],
                args=[
                    DISPATCHED_TTL_S,
                    int(time.time() * 1000) + self._watchdog_ms,
                    delivery.event_id,
                    *pairs_and_messages,
                ],
            )
            if sent:
                with self._redis.pipeline(transaction=False) as pipe:
                    count_finished(pipe, DISPATCH_QUEUE)
                    self._received(pipe, delivery, event.type)
                    self._trail.add_to(pipe, delivery.event_id, "dispatched", handlers=names)
                    pipe.execute()
                log.info("dispatched", extra={"handlers": names})
            else:
                log.info("already dispatched", extra={"handlers": names})
            return names

    def _park(
        self,
        delivery: Delivery,
        event_type: str | None,
        reason: ParkReason,
        errors: list[dict[str, str]],
    ) -> None:
        self._parked.put(
            delivery.event_id,
            {
                "event_id": delivery.event_id,
                "type": event_type or "",
                "endpoint": delivery.endpoint,
                "received_at": repr(delivery.received_at),
                "parked_at": repr(time.time()),
                "reason": reason.value,
                "errors": errors,
                "body": delivery.body,
            },
        )
        with self._redis.pipeline(transaction=False) as pipe:
            cancel(pipe, delivery.event_id)
            self._received(pipe, delivery, event_type or "")
            self._trail.add_to(pipe, delivery.event_id, "parked", reason=reason.value)
            pipe.execute()
        log.warning("parked", extra={"reason": reason.value, "errors": errors})

    def _received(self, pipe: redis.client.Pipeline, delivery: Delivery, event_type: str) -> None:
        self._trail.received_to(
            pipe,
            delivery.event_id,
            delivery.received_at,
            type=event_type[:100],
            endpoint=delivery.endpoint,
            bytes=len(delivery.body.encode()),
        )
