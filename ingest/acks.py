"""When the ingress may answer 202: ``CALHOOK_ACK_DURABILITY``.

``written`` (the default) answers once Redis has run the write: it is in the server's memory and
in its append-only file's buffer, fsynced within a second (``appendfsync everysec``), so a crash
of the Redis host can lose the last second of acknowledged events. The two stronger levels add
one command after each publish batch, on the same connection, in the same round trip:

* ``fsynced``: ``WAITAOF 1 0``, the batch is in the master's AOF on disk; a ``kill -9`` or a
  power cut of the Redis host loses nothing acknowledged. Needs WAITAOF (Redis 7.2+, Valkey) and
  ``appendonly yes``. With ``appendfsync everysec`` the server fsyncs for a waiting client within
  about 100 ms; with ``appendfsync always``, about a millisecond.
* ``replicated``: also ``WAIT N``, N replicas have received the batch, so a failover to one of
  them loses nothing acknowledged, and a power cut of every host at once loses nothing either
  (the master's disk has it). A server without WAITAOF gets ``WAIT N`` alone.

Why not ``WAITAOF 1 N`` (the replicas' disks too)? A replica reports how much of its AOF is on
disk about once a second, so every acknowledgement would take about a second (measured: 1.0 s
per batch with Valkey 8.1, even with ``appendfsync always`` on the replica). The replica's own
AOF catches up within that second anyway; losing an acknowledged event then takes the master's
disk *and* every confirming replica failing within it.

A batch that is not confirmed within ``CALHOOK_ACK_TIMEOUT_S`` is not known to be durable, so it
goes to the spool like a failed write (still 202, nothing lost); the spool drains it back through
the same confirmation. Each confirmed batch also increments one counter in the same script
(:data:`~calhook.store.keys.CONFIRMED`): WAITAOF and WAIT wait for the connection's *last write*,
and a batch of duplicates writes nothing, so without it a resent batch whose first write was
never confirmed would be confirmed at once.
"""

from __future__ import annotations

import dataclasses
import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from calhook.settings import Settings

log = logging.getLogger("calhook.ingest.acks")


class AckConfigError(Exception):
    """The broker cannot give the acknowledgement asked for; the message says what to change."""


@dataclasses.dataclass(frozen=True, slots=True)
class AckRule:
    """The confirmation each publish batch waits for."""

    level: str
    replicas: int
    timeout_s: float
    # False on a server without WAITAOF: 'replicated' waits with WAIT alone.
    waitaof: bool = True

    def commands(self) -> list[tuple[str | int, ...]]:
        """The commands sent after each batch, on its connection."""
        timeout_ms = max(1, round(self.timeout_s * 1000))
        waits: list[tuple[str | int, ...]] = []
        if self.waitaof:
            waits.append(("WAITAOF", 1, 0, timeout_ms))
        if self.replicas:
            waits.append(("WAIT", self.replicas, timeout_ms))
        return waits

    def shortfall(self, replies: list[object]) -> str | None:
        """None if ``replies`` (to :meth:`commands`) confirm the batch, else what is missing."""
        missing = []
        if self.waitaof:
            local = int(replies[0][0])  # type: ignore[index]
            if local < 1:
                missing.append("not on the master's disk")
        if self.replicas:
            received = int(replies[-1])  # type: ignore[call-overload]
            if received < self.replicas:
                missing.append(f"on {received} of {self.replicas} replicas")
        if not missing:
            return None
        return f"not confirmed within {self.timeout_s:g} s: {', '.join(missing)}"


async def _has_waitaof(redis: Redis) -> bool:
    try:
        # Asks nothing of the disk (numlocal 0) and returns at once on an idle connection.
        await redis.execute_command("WAITAOF", 0, 0, 1)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return False
        raise
    return True


def ack_rule(settings: Settings) -> AckRule | None:
    """The rule of ``settings``; None for ``written`` (no confirmation is waited for)."""
    if settings.ack_durability == "written":
        return None
    replicas = settings.ack_replicas if settings.ack_durability == "replicated" else 0
    return AckRule(settings.ack_durability, replicas, settings.ack_timeout_s)


async def fit(rule: AckRule, redis: Redis) -> AckRule:
    """``rule`` as this broker can honour it; AckConfigError if it cannot at all.

    Connection errors propagate: the caller asks again once Redis answers.
    """
    if not await _has_waitaof(redis):
        version = (await redis.info("server")).get("redis_version", "?")
        if rule.level == "fsynced":
            raise AckConfigError(
                f"CALHOOK_ACK_DURABILITY=fsynced needs WAITAOF (Redis 7.2 or later, or Valkey); "
                f"the broker is version {version}"
            )
        log.warning(
            "no WAITAOF on the broker: 'replicated' waits for replicas to receive each batch "
            "(WAIT), not for the master's disk",
            extra={"version": version},
        )
        rule = dataclasses.replace(rule, waitaof=False)
    else:
        try:
            # A connection that wrote nothing is confirmed at once, so this only asks whether
            # the server could confirm at all (it refuses WAITAOF 1 without appendonly).
            await redis.execute_command("WAITAOF", 1, 0, 1)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            raise AckConfigError(
                f"CALHOOK_ACK_DURABILITY={rule.level} needs appendonly yes on the broker: {exc}"
            ) from None
    if rule.replicas:
        replication = await redis.info("replication")
        connected = int(replication.get("connected_slaves", 0))
        if connected < rule.replicas:
            # Not refused: a replica may be restarting. Until enough are back, events spool.
            log.warning(
                "fewer replicas than CALHOOK_ACK_REPLICAS: events spool until enough are back",
                extra={"connected": connected, "required": rule.replicas},
            )
    return rule
