"""Operational notices: each transition in ``calhook:notices`` told to the operators once.

The pair store writes a stream entry for every operational transition (``notice()`` in
``calhook/store/lua/_lib.lua``: a breaker opened or closed, a failure group opened, closed or
resolved, a handler paused or resumed); the scheduler adds the dead letters crossing
CALHOOK_NOTICE_DEAD_LETTERS (:func:`check_dead_letters`). ``calhook scheduler`` runs a
:class:`NoticeLoop` in a thread of its own (:func:`start_notices`), so a slow receiver never
delays the sweep, and it sends each entry to every configured channel:

- chat (CALHOOK_NOTICE_CHAT): one line to CALHOOK_CHAT_WEBHOOK_URL;
- e-mail (CALHOOK_NOTICE_EMAIL): a message to each address through CALHOOK_SMTP_URL;
- an operator's URL (CALHOOK_NOTICE_URL): JSON signed as Standard Webhooks.

Once per transition, fleet-wide: the loops of every scheduler read through one consumer group,
so each entry goes to one of them, which acknowledges it once every channel took it. A channel
that failed is tried again when the entry has been idle for a minute (``XAUTOCLAIM``: the same
step takes over the entries of a scheduler that died); the channels that took it are marked in
Redis and not sent to again. An entry not delivered a day after it was written is dropped with an
error log.

The stream holds no personal data (ids, handler and circuit names, error classes, counts, an
operator's name and reason); the messages carry nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any, Protocol

import aiohttp
import orjson
import redis
import redis.asyncio

from calhook.settings import Settings, decode_whsec
from calhook.store.connect import async_twin
from calhook.store.keys import DEAD, NOTICES, NOTICES_DEAD_LETTERS, NOTICES_MAX
from workers.errors import HandlerError, TransientError
from workers.http import read_answer, sessions
from workers.notify.chat import POSTED_TTL_S, post_chat, posted_key
from workers.notify.errors import SmtpUrlError
from workers.notify.mail import SentLog, SmtpUrl, message_id, send_messages

log = logging.getLogger("calhook.notices")

GROUP = "calhook-notices"
CLAIM_IDLE_S = 60.0
"""An entry pending this long (a channel failed, or its scheduler died) is taken and tried again."""
SETUP_LOOKBACK_S = 3600.0
"""How far back a new consumer group starts reading."""
GIVE_UP_S = 86_400.0
"""An entry not delivered this long after it was written is dropped, with an error log."""
SEND_DEADLINE_S = 30.0
"""The longest one entry's sends take (its channels at once); below the claim time, so no other
scheduler takes an entry over while it is being sent."""
URL_TIMEOUT_S = 10.0
DEAD_LETTER_STATE = NOTICES_DEAD_LETTERS
"""``above`` or ``below`` CALHOOK_NOTICE_DEAD_LETTERS, as last told."""
# Entries one step handles at most from each source, so that retries cannot starve new ones.
_STEP_MOST = 100

_url_sessions = sessions(URL_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class Notice:
    """One entry of the stream: its id, the transition's kind and subject (a handler, a circuit),
    the store's one-line text, when (epoch s) and the transition's fields."""

    id: str
    kind: str
    subject: str
    text: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[bytes, bytes]) -> Notice:
        """The notice of a stream entry as ``notice()`` writes it."""
        got = {_text(k): _text(v) for k, v in fields.items()}
        try:
            at = float(got.get("at", ""))
        except ValueError:
            at = written_at(entry_id)
        try:
            data = orjson.loads(got.get("data") or "{}")
        except orjson.JSONDecodeError:
            data = {}
        return cls(
            entry_id,
            got.get("kind", "notice"),
            got.get("subject", ""),
            got.get("text", ""),
            at,
            data if isinstance(data, dict) else {},
        )

    @property
    def key(self) -> str:
        """What marks this notice's sends in Redis (``calhook:notify:…``)."""
        return f"notice:{self.id}"

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    def next_command(self) -> str:
        """What an operator runs next, or ``""``."""
        kind, data = self.kind, self.data
        if kind.startswith("group_"):
            return f"calhook failures show {data.get('group') or self.subject}"
        if kind == "handler_paused":
            return f"calhook handlers resume {data.get('handler') or self.subject}"
        if kind in ("breaker_opened", "breaker_closed", "handler_resumed"):
            return "calhook handlers list"
        if kind.startswith("dead_letters_"):
            return "calhook dlq list"
        if kind.startswith("ingress_"):
            return "calhook queues"
        return ""

    def line(self, *, chat: bool = False) -> str:
        """The one line people read; ``chat``: Slack mrkdwn, its control characters escaped."""
        text = self.text if self.subject in self.text else f"{self.subject}: {self.text}"
        command = self.next_command()
        # An open breaker probes, and closes, by itself: pausing stops the probes for an outage
        # known to last.
        hint = (
            " (it closes by itself at the first probe that succeeds; `calhook handlers pause` "
            "stops the probes)"
            if self.kind == "breaker_opened"
            else ""
        )
        if chat:
            parts = [f"*{_escape(self.kind)}*", _escape(self.when), _escape(text)]
            if command:
                parts.append(f"next: `{_escape(command)}`{_escape(hint)}")
        else:
            parts = [f"[calhook] {self.kind}", self.when, text]
            if command:
                parts.append(f"next: {command}{hint}")
        return " | ".join(parts)

    def webhook_body(self) -> bytes:
        """The JSON of the Standard Webhooks POST."""
        at = datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds")
        return orjson.dumps(
            {
                "type": f"calhook.{self.kind}",
                "timestamp": at.replace("+00:00", "Z"),
                "data": {**self.data, "subject": self.subject, "text": self.text},
            }
        )


def written_at(entry_id: str) -> float:
    """When Redis wrote a stream entry (epoch s), from its id."""
    return int(entry_id.split("-", 1)[0]) / 1000


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` of a Standard Webhooks request."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _names(value: Any) -> list[str]:
    # cjson writes an empty list as {}.
    return [str(v) for v in value] if isinstance(value, list) else []


def _escape(text: str) -> str:
    # Slack reads <…> as links or mentions (<!channel>).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- channels ---------------------------------------------------------------------------------


class Channel(Protocol):
    """Where notices go; ``send`` returns once the receiver took the notice (or had it already),
    and raises otherwise."""

    @property
    def name(self) -> str: ...

    async def send(self, notice: Notice, client: redis.asyncio.Redis) -> None: ...


@dataclass(frozen=True, slots=True)
class ChatChannel:
    """The chat webhook (its own mark in Redis: :func:`workers.notify.chat.post_chat`)."""

    url: str = field(repr=False)
    name: str = "chat"

    async def send(self, notice: Notice, client: redis.asyncio.Redis) -> None:
        await post_chat(client, self.url, notice.line(chat=True), idempotency_key=notice.key)


@dataclass(frozen=True, slots=True)
class MailChannel:
    """A message per address; each address once (:class:`workers.notify.mail.SentLog`)."""

    smtp_url: SmtpUrl
    sender: str
    to: tuple[str, ...]
    name: str = "email"

    async def send(self, notice: Notice, client: redis.asyncio.Redis) -> None:
        messages = [(r, self.message(notice, r)) for r in self.to]
        envelope_from = email.utils.parseaddr(self.sender)[1] or self.sender
        await send_messages(self.smtp_url, envelope_from, messages, SentLog(client, notice.key))

    def message(self, notice: Notice, recipient: str) -> EmailMessage:
        """The message to one address: the same on every try (its Message-ID and Date)."""
        message = EmailMessage(policy=SMTP_POLICY)
        message["From"] = self.sender
        message["To"] = recipient
        message["Subject"] = f"[calhook] {notice.kind}: {notice.subject}"
        message["Date"] = email.utils.format_datetime(datetime.fromtimestamp(notice.at, UTC))
        message["Message-ID"] = message_id(notice.key, recipient)
        # RFC 3834: tells auto-responders (out-of-office) not to answer a machine.
        message["Auto-Submitted"] = "auto-generated"
        message["X-Calhook-Notice"] = notice.kind
        message.set_content(notice.line() + "\n", charset="utf-8", cte="quoted-printable")
        return message


@dataclass(frozen=True, slots=True)
class UrlChannel:
    """A POST signed as Standard Webhooks (``webhook-id`` is the entry's id, the same on every
    try, so a receiver can drop a copy); any 2xx takes it. The URL is never logged."""

    url: str = field(repr=False)
    key: bytes = field(repr=False)
    name: str = "url"

    async def send(self, notice: Notice, client: redis.asyncio.Redis) -> None:
        mark = posted_key(f"{notice.key}:url")
        if await client.exists(mark):
            return
        body = notice.webhook_body()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": notice.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.key, notice.id, timestamp, body),
        }
        problem: TransientError | None = None
        try:
            session = await _url_sessions.get()
            async with session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                answer = await read_answer(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = TransientError(f"notice URL unreachable: {type(exc).__name__}")
        if problem is not None:
            # Raised outside the except block: aiohttp's exception may quote the URL.
            raise problem
        if not answer.is_success:
            raise TransientError(f"notice URL answered {answer.status_code}")
        await client.set(mark, 1, ex=POSTED_TTL_S)


def channels_of(settings: Settings) -> list[Channel]:
    """The channels the settings configure (e-mail left out, with an error logged, if
    CALHOOK_SMTP_URL is unusable)."""
    channels: list[Channel] = []
    if settings.notices_to_chat:
        channels.append(ChatChannel(settings.chat_webhook_url.get_secret_value()))
    if settings.notice_email:
        try:
            smtp = SmtpUrl.parse(settings.smtp_url)
        except SmtpUrlError as exc:
            # The sweep must not stop for a notice setting: the other channels still run.
            log.error("operational notices by e-mail are off", extra={"error": str(exc)})
        else:
            channels.append(MailChannel(smtp, settings.notify_from, settings.notice_email))
    if settings.notice_url:
        key = decode_whsec(settings.notice_secret.get_secret_value())
        channels.append(UrlChannel(settings.notice_url, key))
    return channels


# --- the loop ---------------------------------------------------------------------------------


def consumer_name() -> str:
    """This loop's name in the consumer group: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class NoticeLoop:
    """Reads ``calhook:notices`` through the consumer group and sends each entry to every
    channel; see the module docstring."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        channels: Sequence[Channel],
        *,
        consumer: str | None = None,
        claim_idle_s: float = CLAIM_IDLE_S,
        give_up_s: float = GIVE_UP_S,
    ) -> None:
        self.client = client
        self.channels = tuple(channels)
        self.consumer = consumer or consumer_name()
        self.claim_idle_s = claim_idle_s
        self.give_up_s = give_up_s
        self.deadline_s = min(SEND_DEADLINE_S, claim_idle_s / 2)

    async def setup(self) -> None:
        """Create the consumer group (and the stream) unless it exists. A new group starts an
        hour back: what was written just before the first scheduler read is told too, and
        switching notices on for a deployment that ran long without does not replay its past."""
        start = f"{int((time.time() - SETUP_LOOKBACK_S) * 1000)}-0"
        try:
            await self.client.xgroup_create(NOTICES, GROUP, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def step(self, block_ms: int | None = None) -> int:
        """Try again the entries idle past the claim time, then read the new ones (waiting up
        to ``block_ms`` for one); return how many entries were done with (sent or dropped)."""
        done = 0
        cursor: Any = "0-0"
        for _ in range(_STEP_MOST):
            # One at a time: an entry is claimed just before it is sent, so its idle time
            # stays far below the claim time while this loop works on it.
            got = await self.client.xautoclaim(
                NOTICES,
                GROUP,
                self.consumer,
                min_idle_time=int(self.claim_idle_s * 1000),
                start_id=cursor,
                count=1,
            )
            cursor, claimed = got[0], got[1]
            for entry_id, fields in claimed:
                done += await self._handle(_text(entry_id), fields)
            if _text(cursor) == "0-0":
                break
        for _ in range(_STEP_MOST):
            read: Any = await self.client.xreadgroup(
                GROUP, self.consumer, {NOTICES: ">"}, count=1, block=block_ms
            )
            if not read:
                break
            block_ms = None
            for _stream, entries in read:
                for entry_id, fields in entries:
                    done += await self._handle(_text(entry_id), fields)
        return done

    async def _handle(self, entry_id: str, fields: dict[bytes, bytes] | None) -> int:
        if not fields:
            # Trimmed from the stream while pending: nothing left to tell.
            await self.client.xack(NOTICES, GROUP, entry_id)
            return 1
        notice = Notice.from_entry(entry_id, fields)
        about = {"notice": entry_id, "kind": notice.kind, "subject": notice.subject}
        if time.time() - written_at(entry_id) > self.give_up_s:
            log.error("notice not delivered within a day, dropped", extra=about)
            await self.client.xack(NOTICES, GROUP, entry_id)
            return 1
        failed = await self._deliver(notice)
        if failed:
            log.warning(
                "notice not delivered, tried again later", extra={**about, "failed": failed}
            )
            return 0
        await self.client.xack(NOTICES, GROUP, entry_id)
        log.info("notice delivered", extra=about)
        return 1

    async def _deliver(self, notice: Notice) -> list[str]:
        """Send to every channel at once; the names of those that failed."""

        async def one(channel: Channel) -> str | None:
            try:
                async with asyncio.timeout(self.deadline_s):
                    await channel.send(notice, self.client)
            except Exception as exc:
                # Channels raise texts that quote no URL and no address; anything else is
                # named by its class only.
                why = str(exc) if isinstance(exc, HandlerError) else type(exc).__name__
                log.warning(
                    "notice channel failed",
                    extra={"notice": notice.id, "channel": channel.name, "error": why},
                )
                return channel.name
            return None

        results = await asyncio.gather(*(one(c) for c in self.channels))
        return [name for name in results if name]

    async def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        """Step until ``stop`` is set; Redis errors and bugs are waited out, never fatal."""
        log.info(
            "notices started",
            extra={"channels": [c.name for c in self.channels], "consumer": self.consumer},
        )
        ready = False
        while not stop.is_set():
            try:
                if not ready:
                    await self.setup()
                    ready = True
                await self.step(block_ms)
                continue
            except redis.ResponseError as exc:
                # The stream (and its group) was deleted: create them again.
                ready = False
                if "NOGROUP" in str(exc):
                    continue
                log.warning("notices: redis refused", extra={"error": str(exc)})
            except redis.RedisError as exc:
                log.warning("notices cannot reach redis", extra={"error": repr(exc)})
            except Exception:
                log.exception("notices failed")
            await asyncio.sleep(1.0)
        await self.close()
        log.info("notices stopped")

    async def close(self) -> None:
        """Leave the group if nothing is pending for this consumer (else it stays, for another
        scheduler to take over after the claim time)."""
        with contextlib.suppress(redis.RedisError):
            mine = await self.client.xpending_range(
                NOTICES, GROUP, min="-", max="+", count=1, consumername=self.consumer
            )
            if not mine:
                await self.client.xgroup_delconsumer(NOTICES, GROUP, self.consumer)


def start_notices(
    client: redis.Redis, settings: Settings, stop: threading.Event
) -> threading.Thread | None:
    """Run a :class:`NoticeLoop` in a thread of its own, on its own event loop and an asyncio
    twin of ``client``, until ``stop`` is set; None when no channel is configured."""
    channels = channels_of(settings)
    if not channels:
        log.info("no channel for operational notices")
        return None

    async def serve() -> None:
        aclient = async_twin(client)
        try:
            await NoticeLoop(aclient, channels).run(stop)
        finally:
            await aclient.aclose()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="calhook-notices")
    thread.daemon = True
    thread.start()
    return thread


# --- the dead letters' threshold --------------------------------------------------------------

# One step, so that two schedulers tell one crossing once: count, compare with the state last
# told, and write the notice with the new state. A first look tells only a count above.
_CROSSING = """
local n = redis.call('ZCARD', KEYS[1])
local threshold = tonumber(ARGV[1])
local state = n >= threshold and 'above' or 'below'
local was = redis.call('GET', KEYS[2])
if was == state then return {state, n, 0} end
redis.call('SET', KEYS[2], state)
if not was and state == 'below' then return {state, n, 0} end
local t = redis.call('TIME')
local text
if state == 'above' then
  text = 'dead letters: ' .. n .. ', at or above the threshold of ' .. threshold
else
  text = 'dead letters: ' .. n .. ', below the threshold of ' .. threshold .. ' again'
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'kind', 'dead_letters_' .. state,
  'subject', 'dead letters', 'text', text,
  'at', string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1000000),
  'data', cjson.encode({count = n, threshold = threshold}))
return {state, n, 1}
"""


def check_dead_letters(client: redis.Redis, threshold: int) -> str | None:
    """Write a notice if the dead letters crossed ``threshold`` since the last look (any
    scheduler's): ``"above"`` or ``"below"``, else None. A threshold of 0 checks nothing."""
    if threshold <= 0:
        return None
    state, count, told = client.register_script(_CROSSING)(
        keys=[DEAD, DEAD_LETTER_STATE, NOTICES], args=[threshold, NOTICES_MAX]
    )
    if not told:
        return None
    crossed = _text(state)
    log.log(
        logging.WARNING if crossed == "above" else logging.INFO,
        "dead letters crossed the threshold",
        extra={"state": crossed, "dead_letters": int(count), "threshold": threshold},
    )
    return crossed
