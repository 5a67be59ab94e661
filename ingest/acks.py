"""When the ingress may answer 202: ``CALHOOK_ACK_DURABILITY``.

``written`` (the default) answers once Redis has run the write: it is in the server's memory and
in its append-only file's buffer, fsynced within a second (``appendfsync everysec``), so a crash
of the Redis host can lose the last second of acknowledged events. The two stronger levels add
one command after each publish batch, on the same connection, in the same round trip:

* ``fsynced``: ``WAITAOF 1 0``, the batch is in the master's AOF on disk; a ``kill -9`` or a
  power cut of the Redis host loses nothing acknowledged. Needs WAITAOF (Redis 7.2+, Valkey) and
  ``appendonly yes``.
* ``replicated``: ``WAITAOF 1 N``, also in the AOF of N replicas, so a failover to one of them
  loses nothing acknowledged. Replicas need ``appendonly yes`` too. A server without WAITAOF
  gets ``WAIT N``: the replicas have the batch in memory, which survives a failover but not a
  power cut of every host at once.

A batch that is not confirmed within ``CALHOOK_ACK_TIMEOUT_S`` is not known to be durable, so it
goes to the spool like a failed write (still 202, nothing lost); the spool drains it back through
the same confirmation. Each confirmed batch also increments one counter
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
    # False on a server without WAITAOF: 'replicated' waits with WAIT (replicas' memory).
    waitaof: bool = True

    def command(self) -> tuple[str | int, ...]:
        """The command sent after each batch."""
        timeout_ms = max(1, round(self.timeout_s * 1000))
        if self.waitaof:
            return ("WAITAOF", 1, self.replicas, timeout_ms)
        return ("WAIT", self.replicas, timeout_ms)

    def shortfall(self, reply: object) -> str | None:
        """None if ``reply`` confirms the batch, else what is missing (for the log)."""
        if self.waitaof:
            local, replicas = (int(n) for n in reply)  # type: ignore[attr-defined]
            if local >= 1 and replicas >= self.replicas:
                return None
            return (
                f"not confirmed within {self.timeout_s:g} s: on the master's disk "
                f"{'yes' if local else 'no'}, on {replicas} of {self.replicas} replicas' disks"
            )
        replicas = int(reply)  # type: ignore[call-overload]
        if replicas >= self.replicas:
            return None
        return (
            f"not confirmed within {self.timeout_s:g} s: on {replicas} of {self.replicas} replicas"
        )


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
            "(WAIT), not for any disk",
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
