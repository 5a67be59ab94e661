"""Notice e-mails over SMTP (aiosmtplib, on the event loop): the URL, the message, and sending
each recipient's copy once.

Effectively once per recipient: each recipient gets a message of their own whose Message-ID and
Date derive from the delivery (never from the clock), so a retry sends the identical mail; and a
recipient the server accepted is recorded in Redis (:class:`SentLog`) and skipped on a retry, so
a failure at recipient 3 does not mail recipients 1 and 2 again. A crash between the server's
"250" and the record can still send one copy twice; it carries the same Message-ID, which mail
clients use to fold duplicates.

SMTP answers map to the worker's errors: a 4xx or a dropped connection is transient, a 5xx (or a
failed login, a certificate that does not verify, a server without the STARTTLS or AUTH the URL
asks for) is permanent. Error texts mask addresses,
because they reach the dead-letter store and its tracebacks.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib
import redis.asyncio

from calhook.privacy import mask_email
from calhook.store.keys import NOTIFY
from workers.errors import HandlerError, PermanentError, TransientError
from workers.notify.errors import SmtpUrlError
from workers.notify.templates import Rendered

log = logging.getLogger("calhook.notify")

SENT_TTL_S = 7 * 24 * 3600
"""How long a sent recipient is remembered: longer than the whole retry schedule (about a day)."""

_DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_EMAIL = re.compile(r"[^\s<>@]+@[^\s<>@]+")


@dataclass(frozen=True, slots=True)
class SmtpUrl:
    """``smtp://[user:password@]host:port[?starttls=true][&timeout=30]`` or ``smtps://…``."""

    host: str
    port: int
    implicit_tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0

    @classmethod
    def parse(cls, url: str) -> SmtpUrl:
        """Parse CALHOOK_SMTP_URL; SmtpUrlError says what is wrong, never the password."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise SmtpUrlError("CALHOOK_SMTP_URL: not a valid URL") from None
        if parts.scheme not in _DEFAULT_PORTS:
            raise SmtpUrlError("CALHOOK_SMTP_URL: the scheme must be smtp:// or smtps://")
        if not parts.hostname:
            raise SmtpUrlError("CALHOOK_SMTP_URL: no host")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(options) - {"starttls", "timeout"})
        if unknown:
            raise SmtpUrlError(f"CALHOOK_SMTP_URL: unknown option(s) {', '.join(unknown)}")
        starttls = _flag(options.get("starttls", ""))
        if starttls and parts.scheme == "smtps":
            raise SmtpUrlError("CALHOOK_SMTP_URL: smtps:// is TLS already; drop starttls")
        try:
            timeout_s = float(options.get("timeout", "30"))
        except ValueError:
            raise SmtpUrlError("CALHOOK_SMTP_URL: timeout must be a number of seconds") from None
        return cls(
            host=parts.hostname,
            port=port or _DEFAULT_PORTS[parts.scheme],
            implicit_tls=parts.scheme == "smtps",
            starttls=starttls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout_s=timeout_s,
        )


def _flag(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise SmtpUrlError("CALHOOK_SMTP_URL: starttls must be true or false")


def message_id(event_id: str, recipient: str) -> str:
    """The Message-ID of the notice of ``event_id`` to ``recipient``: the same on every retry."""
    return f"<{_digest(event_id, recipient)}@calhook>"


def _digest(event_id: str, recipient: str) -> str:
    return hashlib.sha256(f"{event_id}\n{recipient.lower()}".encode()).hexdigest()[:32]


def build_message(
    rendered: Rendered,
    *,
    sender: str,
    recipient: str,
    event_id: str,
    date: datetime,
    language: str,
) -> EmailMessage:
    """The e-mail to one recipient; headers are encoded (RFC 2047) where they need it."""
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = rendered.subject
    message["Date"] = email.utils.format_datetime(date)
    message["Message-ID"] = message_id(event_id, recipient)
    # RFC 3834: tells auto-responders (out-of-office) not to answer a machine.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Calhook-Event-Id"] = event_id
    # Quoted-printable keeps the message 7-bit, so any relay takes it (no 8BITMIME needed).
    message.set_content(rendered.body, charset="utf-8", cte="quoted-printable")
    # After set_content, which replaces every Content-* header.
    message["Content-Language"] = language
    return message


class SentLog:
    """The recipients an (event, handler) has already mailed, in a Redis set.

    Members are digests, not addresses: the set only has to recognise a recipient.
    """

    def __init__(
        self, client: redis.asyncio.Redis, idempotency_key: str, ttl_s: int = SENT_TTL_S
    ) -> None:
        self._client = client
        self._event_key = idempotency_key
        self.key = f"{NOTIFY}sent:{idempotency_key}"
        self._ttl_s = ttl_s

    async def has(self, recipient: str) -> bool:
        """Whether ``recipient`` was mailed already."""
        return bool(await self._client.sismember(self.key, _digest(self._event_key, recipient)))

    async def add(self, recipient: str) -> None:
        """Remember that the server accepted the message to ``recipient``."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.sadd(self.key, _digest(self._event_key, recipient))
            pipe.expire(self.key, self._ttl_s)
            await pipe.execute()


async def send_messages(
    smtp_url: SmtpUrl,
    envelope_from: str,
    messages: Sequence[tuple[str, EmailMessage]],
    sent: SentLog,
    *,
    tls_context: ssl.SSLContext | None = None,
) -> int:
    """Send each (recipient, message) not yet in ``sent``; return how many were sent now.

    A refused recipient does not stop the others; afterwards a TransientError is raised if any
    refusal may pass on a retry, else a PermanentError if any was final.
    """
    pending = [(r, m) for r, m in messages if not await sent.has(r)]
    if not pending:
        return 0
    refusals: list[tuple[str, HandlerError]] = []
    count = 0
    async with _Session(smtp_url, tls_context) as session:
        for recipient, message in pending:
            problem = await session.send(envelope_from, recipient, message)
            if problem is not None:
                refusals.append((recipient, problem))
                continue
            await sent.add(recipient)
            count += 1
            log.info("notice mailed", extra={"recipient": mask_email(recipient)})
    transient = [p for _, p in refusals if isinstance(p, TransientError)]
    if transient:
        raise TransientError(f"{len(refusals)} of {len(pending)} refused; first: {transient[0]}")
    if refusals:
        raise PermanentError(f"{len(refusals)} of {len(pending)} refused; first: {refusals[0][1]}")
    return count


class _Session:
    """One SMTP connection (TLS and login as configured); errors become the workers' errors."""

    def __init__(self, url: SmtpUrl, tls_context: ssl.SSLContext | None) -> None:
        self._url = url
        self._tls = tls_context or ssl.create_default_context()
        self._smtp: aiosmtplib.SMTP | None = None

    async def __aenter__(self) -> _Session:
        problem: HandlerError | None = None
        try:
            await self._connect()
        except Exception as exc:
            problem = _classify(exc, "connecting")
        if problem is not None:
            # Raised outside the except block: the SMTP library's exception may quote addresses.
            await self.__aexit__()
            raise problem
        return self

    async def _connect(self) -> None:
        url = self._url
        self._smtp = aiosmtplib.SMTP(
            hostname=url.host,
            port=url.port,
            use_tls=url.implicit_tls,
            # Explicit: aiosmtplib would otherwise upgrade whenever the server offers STARTTLS.
            start_tls=url.starttls,
            tls_context=self._tls,
            timeout=url.timeout_s,
        )
        await self._smtp.connect()
        if url.username:
            await self._smtp.login(url.username, url.password or "")

    async def send(
        self, envelope_from: str, recipient: str, message: EmailMessage
    ) -> HandlerError | None:
        """Send one message; a refusal is returned, a broken connection is raised."""
        assert self._smtp is not None
        try:
            await self._smtp.send_message(message, sender=envelope_from, recipients=[recipient])
        except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPDataError) as exc:
            # The server refused this message only; aiosmtplib has reset the transaction.
            return _classify(exc, f"sending to {mask_email(recipient)}")
        except Exception as exc:
            problem = _classify(exc, f"sending to {mask_email(recipient)}")
        else:
            return None
        raise problem

    async def __aexit__(self, *exc_info: object) -> None:
        if self._smtp is None:
            return
        smtp, self._smtp = self._smtp, None
        if not smtp.is_connected:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()


def _classify(exc: BaseException, doing: str) -> HandlerError:
    """The worker error for an SMTP failure, with a text that names no address."""
    cause = _cause(exc)
    code, reply = _reply(exc)
    what = f"SMTP {doing}: {type(cause).__name__}"
    if code is not None:
        what = f"{what} {code} {_mask_addresses(reply)}".rstrip()
    if isinstance(cause, ssl.SSLCertVerificationError | aiosmtplib.SMTPNotSupported):
        return PermanentError(what)
    if type(cause) is aiosmtplib.SMTPException:
        # aiosmtplib's plain SMTPException says the server lacks what the URL asks for
        # (STARTTLS, AUTH, a login method): only a configuration change helps.
        return PermanentError(what)
    if code is not None:
        return TransientError(what) if 400 <= code < 500 else PermanentError(what)
    if isinstance(cause, aiosmtplib.SMTPException | OSError | TimeoutError):
        return TransientError(what)
    return PermanentError(what)


def _cause(exc: BaseException) -> BaseException:
    """What went wrong underneath aiosmtplib's connection errors (a refused connection, a
    certificate that does not verify), which wrap it."""
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected) and (
        exc.__cause__ is not None
    ):
        return exc.__cause__
    return exc


def _reply(exc: BaseException) -> tuple[int | None, str]:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # One recipient per message, so the list holds one refusal.
        for refusal in exc.recipients:
            return refusal.code, _text(refusal.message)
        return None, ""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code, _text(exc.message)
    return None, ""


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())[:300]


def _mask_addresses(text: str) -> str:
    return _EMAIL.sub(lambda m: mask_email(m.group(0)) or "***", text)
