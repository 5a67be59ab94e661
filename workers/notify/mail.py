"""Notice e-mails over SMTP: the URL, the message, and sending each recipient's copy once.

Effectively once per recipient: each recipient gets a message of their own whose Message-ID and
Date derive from the delivery (never from the clock), so a retry sends the identical mail; and a
recipient the server accepted is recorded in Redis (:class:`SentLog`) and skipped on a retry, so
a failure at recipient 3 does not mail recipients 1 and 2 again. A crash between the server's
"250" and the record can still send one copy twice; it carries the same Message-ID, which mail
clients use to fold duplicates.

SMTP answers map to the worker's errors: a 4xx or a dropped connection is transient, a 5xx (or a
failed login, or a certificate that does not verify) is permanent. Error texts mask addresses,
because they reach the dead-letter store and its tracebacks.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from urllib.parse import parse_qsl, unquote, urlsplit

import redis

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

    def __init__(self, client: redis.Redis, idempotency_key: str, ttl_s: int = SENT_TTL_S) -> None:
        self._client = client
        self._event_key = idempotency_key
        self.key = f"{NOTIFY}sent:{idempotency_key}"
        self._ttl_s = ttl_s

    def has(self, recipient: str) -> bool:
        """Whether ``recipient`` was mailed already."""
        return bool(self._client.sismember(self.key, _digest(self._event_key, recipient)))

    def add(self, recipient: str) -> None:
        """Remember that the server accepted the message to ``recipient``."""
        pipe = self._client.pipeline(transaction=True)
        pipe.sadd(self.key, _digest(self._event_key, recipient))
        pipe.expire(self.key, self._ttl_s)
        pipe.execute()


def send_messages(
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
    pending = [(r, m) for r, m in messages if not sent.has(r)]
    if not pending:
        return 0
    refusals: list[tuple[str, HandlerError]] = []
    count = 0
    with _Session(smtp_url, tls_context) as session:
        for recipient, message in pending:
            problem = session.send(envelope_from, recipient, message)
            if problem is not None:
                refusals.append((recipient, problem))
                continue
            sent.add(recipient)
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
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> _Session:
        problem: HandlerError | None = None
        try:
            self._smtp = self._connect()
        except Exception as exc:
            problem = _classify(exc, "connecting")
        if problem is not None:
            # Raised outside the except block: smtplib's exception may quote addresses.
            self.__exit__()
            raise problem
        return self

    def _connect(self) -> smtplib.SMTP:
        url = self._url
        smtp: smtplib.SMTP
        if url.implicit_tls:
            smtp = smtplib.SMTP_SSL(url.host, url.port, timeout=url.timeout_s, context=self._tls)
        else:
            smtp = smtplib.SMTP(url.host, url.port, timeout=url.timeout_s)
        self._smtp = smtp
        smtp.ehlo()
        if url.starttls:
            smtp.starttls(context=self._tls)
            smtp.ehlo()
        if url.username:
            smtp.login(url.username, url.password or "")
        return smtp

    def send(
        self, envelope_from: str, recipient: str, message: EmailMessage
    ) -> HandlerError | None:
        """Send one message; a refusal is returned, a broken connection is raised."""
        assert self._smtp is not None
        try:
            self._smtp.send_message(message, envelope_from, [recipient])
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError) as exc:
            # The server refused this message only; smtplib has reset the transaction.
            return _classify(exc, f"sending to {mask_email(recipient)}")
        except Exception as exc:
            problem = _classify(exc, f"sending to {mask_email(recipient)}")
        else:
            return None
        raise problem

    def __exit__(self, *exc_info: object) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.quit()
        except (smtplib.SMTPException, OSError):
            self._smtp.close()
        self._smtp = None


def _classify(exc: BaseException, doing: str) -> HandlerError:
    """The worker error for an SMTP failure, with a text that names no address."""
    code, reply = _reply(exc)
    what = f"SMTP {doing}: {type(exc).__name__}"
    if code is not None:
        what = f"{what} {code} {_mask_addresses(reply)}".rstrip()
    if isinstance(exc, ssl.SSLCertVerificationError | smtplib.SMTPNotSupportedError):
        return PermanentError(what)
    if code is not None:
        return TransientError(what) if 400 <= code < 500 else PermanentError(what)
    if isinstance(exc, smtplib.SMTPException | OSError):
        return TransientError(what)
    return PermanentError(what)


def _reply(exc: BaseException) -> tuple[int | None, str]:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        # One recipient per message, so the dict holds one (code, reply).
        for code, reply in exc.recipients.values():
            return code, _text(reply)
        return None, ""
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code, _text(exc.smtp_error)
    return None, ""


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())[:300]


def _mask_addresses(text: str) -> str:
    return _EMAIL.sub(lambda m: mask_email(m.group(0)) or "***", text)
