"""A real SMTP server on 127.0.0.1 (aiosmtpd in a thread) that records every message it accepts.

It can require AUTH (checked per transaction, so plain-text tests need no TLS), offer STARTTLS or
speak implicit TLS with a given certificate, and refuse the next RCPT or DATA commands with a
chosen code (451: try again later, 550: never).
"""

from __future__ import annotations

import email
import email.policy
import ssl
import threading
from collections import deque
from dataclasses import dataclass
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from calhook.redis_server import free_port

Stage = Literal["rcpt", "data"]


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted message: the envelope, the parsed message and how the client connected."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message: EmailMessage
    login: str | None
    tls: bool


class _Recorder:
    """aiosmtpd handler hooks: refuse on demand, else accept and record."""

    def __init__(self, credentials: tuple[str, str] | None) -> None:
        self.credentials = credentials
        self.received: list[Received] = []
        # Per stage, what the next commands get: a refusal code, or None to pass.
        self.faults: dict[Stage, deque[int | None]] = {"rcpt": deque(), "data": deque()}
        self.lock = threading.Lock()

    def _fault(self, stage: Stage) -> int | None:
        with self.lock:
            return self.faults[stage].popleft() if self.faults[stage] else None

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.credentials is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        code = self._fault("rcpt")
        if code is not None:
            return f"{code} {_enhanced(code)} Recipient <{address}> refused by the test"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        code = self._fault("data")
        if code is not None:
            return f"{code} {_enhanced(code)} Message refused by the test"
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        login = session.auth_data
        received = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=raw,
            message=message,
            login=login.login.decode() if isinstance(login, LoginPassword) else None,
            # STARTTLS sets session.ssl; implicit TLS shows only on the transport.
            tls=session.ssl is not None
            or bool(server.transport and server.transport.get_extra_info("ssl_object")),
        )
        with self.lock:
            self.received.append(received)
        return "250 2.0.0 Message accepted"

    def authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        ok = (
            self.credentials is not None
            and isinstance(auth_data, LoginPassword)
            and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def _enhanced(code: int) -> str:
    return "4.0.0" if code < 500 else "5.0.0"


class SmtpServer:
    """The server, as a context manager; ``url`` is what CALHOOK_SMTP_URL would hold."""

    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
    ) -> None:
        self.port = free_port()
        self._recorder = _Recorder(credentials)
        self._starttls = tls_context is not None and not implicit_tls
        self._implicit_tls = implicit_tls
        options: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "server_hostname": "localhost",
            "ready_timeout": 10.0,
        }
        if credentials is not None:
            # AUTH without TLS is fine on loopback; auth_required would warn, so MAIL checks it.
            options["authenticator"] = self._recorder.authenticate
            options["auth_require_tls"] = False
        if implicit_tls:
            options["ssl_context"] = tls_context
        elif tls_context is not None:
            options["tls_context"] = tls_context
            options["require_starttls"] = True
        self._controller = Controller(self._recorder, **options)

    def url(self, *, login: tuple[str, str] | None = None) -> str:
        """``smtp://[user:password@]127.0.0.1:<port>`` (with STARTTLS, or smtps://, as served)."""
        scheme = "smtps" if self._implicit_tls else "smtp"
        user = f"{quote(login[0], safe='')}:{quote(login[1], safe='')}@" if login else ""
        query = "?starttls=true" if self._starttls else ""
        return f"{scheme}://{user}127.0.0.1:{self.port}{query}"

    def fail_next(self, stage: Stage, code: int, times: int = 1, after: int = 0) -> None:
        """Let ``after`` RCPT (or DATA) commands pass, then refuse ``times`` with ``code``."""
        with self._recorder.lock:
            self._recorder.faults[stage].extend([None] * after + [code] * times)

    @property
    def received(self) -> list[Received]:
        """Every accepted message, in order."""
        with self._recorder.lock:
            return list(self._recorder.received)

    def delivered_to(self) -> list[str]:
        """Every envelope recipient of every accepted message, in order."""
        return [rcpt for r in self.received for rcpt in r.rcpt_tos]

    def start(self) -> SmtpServer:
        """Start serving; returns self."""
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
