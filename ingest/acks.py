"""When the ingress may answer 202: ``CALHOOK_ACK_DURABILITY``.

``written`` (the default) answers once Redis has run the write: it is in the server's memory and
in its append-only file's buffer, fsynced within a second (``appendfsync everysec``), so a crash
of the Redis host can lose the last second of acknowledged events. The two stronger levels send
their waits after each publish batch, on the same connection, in the same round trip:

* ``fsynced``: ``WAITAOF 1 0``, the batch is in the master's AOF on disk; a ``kill -9`` or a
  power cut of the Redis host loses nothing acknowledged. Needs WAITAOF (Redis 7.2+, Valkey),
  ``appendonly yes`` and ``appendfsync always``: under ``everysec`` the server fsyncs once a
  second, so WAITAOF waits up to a second, or, on servers with redis/redis#13793 (Valkey 8.1.8
  is one: the bench's ``acks`` part counted 4,615 confirmations against 2 fdatasyncs), confirms
  what is not on disk. The ingress refuses to start on a broker that lacks one of the three.
* ``replicated``: ``WAIT N``, N replicas have received the batch, so a failover to one of them
  loses nothing acknowledged; and, where the broker could give ``fsynced``, ``WAITAOF 1 0``
  first, so a power cut of every host at once loses nothing either (the master's disk has it).

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
    # The operator's word that a broker refusing CONFIG has appendfsync always.
    assume_always: bool = False

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


def ack_rule(settings: Settings) -> AckRule | None:
    """The rule of ``settings``; None for ``written`` (no confirmation is waited for)."""
    if settings.ack_durability == "written":
        return None
    replicas = settings.ack_replicas if settings.ack_durability == "replicated" else 0
    return AckRule(
        settings.ack_durability,
        replicas,
        settings.ack_timeout_s,
        assume_always=settings.ack_assume_fsync_always,
    )


async def fit(rule: AckRule, redis: Redis) -> AckRule:
    """``rule`` as this broker can honour it; AckConfigError if it cannot at all.

    Connection errors propagate: the caller asks again once Redis answers.
    """
    version = (await redis.info("server")).get("redis_version", "?")
    policy = await _appendfsync(redis)
    if policy is None and rule.assume_always:
        log.info("the broker refuses CONFIG: appendfsync taken to be always, as configured")
        policy = "always"
    local = await _waitaof_problem(redis, version, policy)
    if rule.level == "fsynced":
        if local is not None:
            raise AckConfigError(f"CALHOOK_ACK_DURABILITY=fsynced needs {local}")
    elif local is not None:
        log.warning(
            "replicated waits for the replicas only, not for the master's disk",
            extra={"reason": f"that needs {local}"},
        )
        rule = dataclasses.replace(rule, waitaof=False)
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


async def _appendfsync(redis: Redis) -> str | None:
    """The broker's fsync policy, or None where CONFIG is refused (managed services)."""
    try:
        config = await redis.config_get("appendfsync")
    except ResponseError:
        return None
    value = config.get("appendfsync")
    return value.decode() if isinstance(value, bytes) else value


async def _waitaof_problem(redis: Redis, version: str, policy: str | None) -> str | None:
    """None if ``WAITAOF 1 0`` confirms that a write is on the master's disk, else what the
    broker lacks for that.

    With ``everysec`` the server fsyncs about once a second: WAITAOF then waits up to a second
    for it, or, on servers with redis/redis#13793 (Valkey 8.1 among them: measured, the bench's
    `acks` part), confirms writes that are not on disk yet. Only ``always`` makes it both fast
    and true.
    """
    try:
        # Asks nothing of the disk (numlocal 0) and returns at once on an idle connection.
        await redis.execute_command("WAITAOF", 0, 0, 1)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return f"WAITAOF (Redis 7.2 or later, or Valkey); the broker is version {version}"
        raise
    try:
        # A connection that wrote nothing is confirmed at once, so this only asks whether the
        # server could confirm at all (it refuses WAITAOF 1 without appendonly).
        await redis.execute_command("WAITAOF", 1, 0, 1)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        return f"appendonly yes on the broker ({exc})"
    if policy is None:
        return (
            "appendfsync always on the broker, which refuses CONFIG, so calhook cannot read it; "
            "if it has it, say so with CALHOOK_ACK_ASSUME_FSYNC_ALWAYS=true"
        )
    if policy != "always":
        return (
            f"appendfsync always on the broker, which has {policy}: the server then fsyncs "
            f"about once a second, so WAITAOF waits up to a second or, on some servers "
            f"(redis/redis#13793), confirms writes not yet on disk"
        )
    return None
