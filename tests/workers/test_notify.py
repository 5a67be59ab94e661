"""Notifications: what is said to whom, once, over a real SMTP server and a real chat webhook."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from calhook.redis_server import free_port
from calhook.settings import Settings
from schemas import CalensoEvent, parse_event
from tests.conftest import FIXTURES
from tests.support.chat_server import WEBHOOK_PATH, ChatServer
from tests.support.smtp_server import SmtpServer
from workers.errors import Defer, PermanentError, TransientError
from workers.notify.chat import posted_key
from workers.notify.errors import SmtpUrlError, TemplateError
from workers.notify.mail import SentLog, SmtpUrl, message_id
from workers.notify.messages import NOTIFY_TYPES, build_notice
from workers.notify.send import send_chat, send_email
from workers.notify.templates import check_templates
from workers.registry import HandlerContext, Registry
from workers.tasks.notify import CHAT_HANDLER, EMAIL_HANDLER, NOTIFY_QUEUE, declare

EVENT_ID = "01JQ7Z4N6W3T2V8K5R9M0XB1CD"
RECEIVED_AT = 1742316069.25
CANCELLED = "appointment.booking.cancelled.nested.json"
STAFF = "sandro.meier@example.com"
OPS = "ops@example.com"
BOSS = "boss@example.com"
PERSONAL = ("Luca", "Brunner", "luca.brunner@", STAFF, OPS, BOSS, "jonas.keller@")

Change = Callable[[dict[str, Any]], None]
MakeSettings = Callable[..., Settings]


def load_event(name: str, *changes: Change) -> CalensoEvent:
    """A fixture payload, changed by ``changes`` (functions of the body), parsed."""
    body = json.loads((FIXTURES / name).read_text())
    for change in changes:
        change(body)
    return parse_event(body)


def data(**values: Any) -> Change:
    """Set ``data`` entries; a dotted key reaches into nested parts (``user.lang_identifier``)."""

    def change(body: dict[str, Any]) -> None:
        for dotted, value in values.items():
            target = body["data"]
            *parents, leaf = dotted.split("__")
            for parent in parents:
                target = target[parent]
            target[leaf] = value

    return change


def context(
    handler: str = EMAIL_HANDLER, attempt: int = 1, event_id: str = EVENT_ID
) -> HandlerContext:
    return HandlerContext(event_id, handler, "default", RECEIVED_AT, attempt)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    with ChatServer() as server:
        yield server


@pytest.fixture
def mail_settings(make_settings: MakeSettings, smtp: SmtpServer) -> MakeSettings:
    """Settings mailing through ``smtp``, ops on CALHOOK_NOTIFY_TO; keyword overrides."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "smtp_url": smtp.url(),
            "notify_from": "Calhook Praxis <notify@example.com>",
            "notify_to": OPS,
        }
        return make_settings(**{**values, **overrides})

    return make


async def mail(
    event: CalensoEvent,
    settings: Settings,
    client: redis.asyncio.Redis,
    attempt: int = 1,
    tls_context: ssl.SSLContext | None = None,
    event_id: str = EVENT_ID,
) -> int:
    return await send_email(
        event,
        context(attempt=attempt, event_id=event_id),
        settings=settings,
        client=client,
        tls_context=tls_context,
    )


# E-mail: who receives what


@pytest.mark.parametrize("shape", ["nested", "flat"])
async def test_a_cancelled_appointment_is_mailed_to_the_resource_and_ops(
    shape: str, mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    event = load_event(f"appointment.booking.cancelled.{shape}.json")

    sent = await mail(event, mail_settings(), aredis_db)

    assert sent == 2
    assert smtp.delivered_to() == [STAFF, OPS]
    for received in smtp.received:
        message = received.message
        (recipient,) = received.rcpt_tos
        assert received.mail_from == "notify@example.com"
        assert message["To"] == recipient
        assert message["From"] == "Calhook Praxis <notify@example.com>"
        assert message["Subject"] == "Storniert: Luca Brunner, 20.03.2025 14:00"
        assert message["Message-ID"] == message_id(EVENT_ID, recipient)
        assert message["Auto-Submitted"] == "auto-generated"
        assert message.get_content_type() == "text/plain"
        assert message.get_content_charset() == "utf-8"
        body = message.get_content()
        for expected in (
            "Luca Brunner",
            "Erstberatung",
            "Praxis Seefeld",
            "20.03.2025 14:00\u201314:45",
            "Sandro Meier",
            "Ich bin leider krank.",
        ):
            assert expected in body


async def test_a_moved_appointment_shows_the_new_time(
    mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    await mail(load_event("appointment.updated.nested.json"), mail_settings(), aredis_db)

    message = smtp.received[0].message
    assert message["Subject"] == "Verschoben: Luca Brunner, neu am 27.03.2025 15:30"
    assert "Neuer Termin: 27.03.2025 15:30\u201316:15" in message.get_content()


async def test_a_cancelled_group_event_goes_to_the_calenso_user_in_summer_time(
    mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    await mail(load_event("event.booking.cancelled.flat.json"), mail_settings(), aredis_db)

    assert smtp.delivered_to() == ["jonas.keller@example.com", OPS]
    message = smtp.received[0].message
    assert message["Subject"] == "Storniert: Nina Gerber, 02.04.2025 18:30"
    body = message.get_content()
    assert "R\u00fcckenfit Gruppenkurs" in body
    assert "Praxis Seefeld, Seefeldstrasse 101, 8008 Z\u00fcrich" in body


@pytest.mark.parametrize(
    ("name", "changes", "amount"),
    [
        ("planned/appointment.booking.payment_failed.nested.json", (), "120.00 CHF"),
        (
            "planned/event.booking.payment_succeeded.nested.json",
            (lambda body: body.update(type="event.booking.payment_failed"),),
            "35.00 CHF",
        ),
    ],
)
async def test_a_failed_payment_names_the_amount(
    name: str,
    changes: tuple[Change, ...],
    amount: str,
    mail_settings: MakeSettings,
    smtp: SmtpServer,
    aredis_db: redis.asyncio.Redis,
) -> None:
    await mail(load_event(name, *changes), mail_settings(), aredis_db)

    message = smtp.received[0].message
    assert message["Subject"].startswith("Zahlung fehlgeschlagen: ")
    assert f"Betrag:    {amount}" in message.get_content()


async def test_an_umlaut_in_the_subject_is_encoded(
    mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    event = load_event(CANCELLED, data(appointment__customer__lastname="M\u00fcller"))

    await mail(event, mail_settings(), aredis_db)

    received = smtp.received[0]
    received.raw.decode("ascii")  # 7-bit clean: any relay takes it
    assert b"\r\nSubject: Storniert: Luca =?utf-8?q?M=C3=BCller" in received.raw
    assert received.message["Subject"] == "Storniert: Luca M\u00fcller, 20.03.2025 14:00"
    assert "Luca M\u00fcller" in received.message.get_content()


# Language and time


async def test_the_calenso_users_language_makes_an_english_notice(
    mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    event = load_event(CANCELLED, data(user__lang_identifier="en"))

    await mail(event, mail_settings(), aredis_db)

    message = smtp.received[0].message
    assert message["Subject"] == "Cancelled: Luca Brunner, 20 March 2025, 14:00"
    assert message["Content-Language"] == "en"
    body = message.get_content()
    assert "The booking of Luca Brunner was cancelled." in body
    assert "When:      20 March 2025, 14:00\u201314:45" in body


@pytest.mark.parametrize(
    ("user", "customer", "default", "expected"),
    [
        (None, "de", "en", "de"),  # the customer's language without a user language
        ("en", "de", "de", "en"),  # the user's language first
        ("de_CH", "en", "en", "de"),  # regional variants count
        ("fr", "en", "de", "en"),  # a language we have no templates for is passed over
        (None, "fr", "en", "en"),  # nothing usable: CALHOOK_NOTIFY_LANGUAGE
        (None, None, "de", "de"),
    ],
)
def test_the_language_comes_from_the_payload_else_the_setting(
    user: str | None, customer: str | None, default: str, expected: str, make_settings: MakeSettings
) -> None:
    event = load_event(
        CANCELLED, data(user__lang_identifier=user, appointment__customer__language=customer)
    )

    notice = build_notice(event, make_settings(notify_language=default))

    assert notice.language == expected


@pytest.mark.parametrize(
    ("changes", "store_tz", "start"),
    [
        ((), "Europe/London", "20.03.2025 13:00"),
        ((data(appointment__start_utc=None, appointment__end_utc=None),), "Asia/Tokyo",
         "20.03.2025 14:00"),
    ],
    ids=["store_tz", "local_start_without_utc"],
)  # fmt: skip
def test_the_time_is_the_stores_local_time(
    changes: tuple[Change, ...], store_tz: str, start: str, make_settings: MakeSettings
) -> None:
    notice = build_notice(load_event(CANCELLED, *changes), make_settings(store_tz=store_tz))

    assert notice.fields["start"] == start


# Recipients


@pytest.mark.parametrize(
    ("changes", "overrides", "expected"),
    [
        ((), {"notify_staff": False}, [OPS]),
        ((data(worker__email=None),), {}, ["jonas.keller@example.com", OPS]),
        ((), {"notify_to": f"SANDRO.Meier@Example.com,{OPS},Ops@Example.COM,{BOSS}"},
         [STAFF, OPS, BOSS]),
        ((), {"notify_to": "not-an-address"}, [STAFF]),
    ],
    ids=["staff_off", "user_when_no_worker_email", "deduplicated", "unusable_left_out"],
)  # fmt: skip
async def test_recipients(
    changes: tuple[Change, ...],
    overrides: dict[str, Any],
    expected: list[str],
    mail_settings: MakeSettings,
    smtp: SmtpServer,
    aredis_db: redis.asyncio.Redis,
) -> None:
    await mail(load_event(CANCELLED, *changes), mail_settings(**overrides), aredis_db)

    assert smtp.delivered_to() == expected


async def test_no_recipient_is_logged_and_not_an_error(
    mail_settings: MakeSettings,
    smtp: SmtpServer,
    aredis_db: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="calhook.notify")

    sent = await mail(
        load_event(CANCELLED), mail_settings(notify_staff=False, notify_to=""), aredis_db
    )

    assert sent == 0
    assert smtp.received == []
    assert [r.getMessage() for r in caplog.records] == ["notice has no recipient"]


# Templates


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


async def test_a_template_in_the_template_dir_overrides_the_built_in_one(
    tmp_path: Path, mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    write(
        tmp_path / "templates" / "de" / "cancelled.txt",
        "Subject: Achtung, $customer sagt ab\n\n$service am $start in $store f\u00e4llt aus.\n",
    )
    settings = mail_settings(notify_to="", template_dir=str(tmp_path / "templates"))

    await mail(load_event(CANCELLED), settings, aredis_db, event_id="01JQ-cancelled")
    await mail(
        load_event("appointment.updated.nested.json"), settings, aredis_db, event_id="01JQ-moved"
    )

    cancelled, moved = (r.message for r in smtp.received)
    assert cancelled["Subject"] == "Achtung, Luca Brunner sagt ab"
    assert cancelled.get_content().replace("\r\n", "\n") == (
        "Erstberatung am 20.03.2025 14:00 in Praxis Seefeld f\u00e4llt aus.\n"
    )
    assert moved["Subject"].startswith("Verschoben: ")  # not overridden: built in


async def test_an_unknown_placeholder_fails_loudly_naming_the_template(
    tmp_path: Path, mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    template = write(tmp_path / "de" / "cancelled.txt", "Subject: $kunde sagt ab\n\nText\n")
    settings = mail_settings(template_dir=str(tmp_path))

    with pytest.raises(TemplateError, match=r"unknown placeholder\(s\) \$kunde") as raised:
        await mail(load_event(CANCELLED), settings, aredis_db)

    assert str(template) in str(raised.value)
    assert isinstance(raised.value, PermanentError)
    assert smtp.received == []
    with pytest.raises(TemplateError, match=r"de/cancelled\.txt"):
        check_templates(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Betreff: x\n\nText\n", "the first line must be 'Subject: "),
        ("Subject: x\n\nKostet 5 $\n", "a '\\$' starts no placeholder"),
    ],
)
def test_a_malformed_template_names_its_problem(tmp_path: Path, text: str, problem: str) -> None:
    write(tmp_path / "en" / "moved.txt", text)

    with pytest.raises(TemplateError, match=f"en/moved.txt: {problem}"):
        check_templates(str(tmp_path))


def test_the_built_in_templates_are_valid() -> None:
    check_templates()


# Effectively once per recipient


async def test_a_retry_after_a_failure_at_the_second_recipient_mails_only_that_one(
    mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    settings = mail_settings(notify_to=f"{OPS},{BOSS}")
    event = load_event(CANCELLED)
    smtp.fail_next("rcpt", 451, after=1)

    with pytest.raises(TransientError, match="451"):
        await mail(event, settings, aredis_db, attempt=1)
    assert smtp.delivered_to() == [STAFF, BOSS]

    assert await mail(event, settings, aredis_db, attempt=2) == 1
    assert await mail(event, settings, aredis_db, attempt=3) == 0

    assert Counter(smtp.delivered_to()) == {STAFF: 1, OPS: 1, BOSS: 1}
    for received in smtp.received:
        assert received.message["Message-ID"] == message_id(EVENT_ID, received.rcpt_tos[0])
    assert 0 < await aredis_db.ttl(SentLog(aredis_db, context().idempotency_key).key) <= 7 * 86400


async def test_a_mail_sent_again_is_identical_message_id_and_all(
    mail_settings: MakeSettings, smtp: SmtpServer, aredis_db: redis.asyncio.Redis
) -> None:
    settings = mail_settings()
    event = load_event(CANCELLED)
    await mail(event, settings, aredis_db)

    # As if the worker died after the server's 250 and before the record.
    await aredis_db.delete(SentLog(aredis_db, context().idempotency_key).key)
    await mail(event, settings, aredis_db, attempt=2)

    first, second = smtp.received[:2], smtp.received[2:]
    assert [r.raw for r in first] == [r.raw for r in second]
    assert len({r.message["Message-ID"] for r in first}) == 2


@pytest.mark.parametrize(
    ("stage", "code", "error"),
    [
        ("rcpt", 451, TransientError),
        ("rcpt", 550, PermanentError),
        ("data", 451, TransientError),
        ("data", 554, PermanentError),
    ],
)
async def test_smtp_refusals_map_to_retry_decisions(
    stage: Any,
    code: int,
    error: type[Exception],
    mail_settings: MakeSettings,
    smtp: SmtpServer,
    aredis_db: redis.asyncio.Redis,
) -> None:
    smtp.fail_next(stage, code)

    with pytest.raises(error, match=f"1 of 2 refused; first: .*{code}") as raised:
        await mail(load_event(CANCELLED), mail_settings(), aredis_db)

    assert type(raised.value) is error
    assert smtp.delivered_to() == [OPS]  # a refused recipient does not stop the others
    assert STAFF not in str(raised.value)
    assert raised.value.__context__ is None
    assert raised.value.__cause__ is None


async def test_an_unreachable_server_is_transient(
    mail_settings: MakeSettings, aredis_db: redis.asyncio.Redis
) -> None:
    settings = mail_settings(smtp_url=f"smtp://127.0.0.1:{free_port()}?timeout=2")

    with pytest.raises(TransientError, match="SMTP connecting: ConnectionRefusedError"):
        await mail(load_event(CANCELLED), settings, aredis_db)


# SMTP login and TLS

LOGIN = ("calhook", "p@ss:w/rd")


async def test_the_url_credentials_log_in(
    make_settings: MakeSettings, aredis_db: redis.asyncio.Redis
) -> None:
    with SmtpServer(credentials=LOGIN) as server:
        settings = make_settings(smtp_url=server.url(login=LOGIN))
        await mail(load_event(CANCELLED), settings, aredis_db)

        assert [r.login for r in server.received] == ["calhook"]


@pytest.mark.parametrize("login", [("calhook", "wrong"), None], ids=["wrong", "none"])
async def test_a_refused_or_missing_login_is_permanent(
    login: tuple[str, str] | None, make_settings: MakeSettings, aredis_db: redis.asyncio.Redis
) -> None:
    with SmtpServer(credentials=LOGIN) as server:
        settings = make_settings(smtp_url=server.url(login=login))
        with pytest.raises(PermanentError, match=r"53[05]"):
            await mail(load_event(CANCELLED), settings, aredis_db)

        assert server.received == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no `openssl` binary to make a self-signed certificate for the TLS tests")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "smtps"])
async def test_tls_and_login(
    implicit_tls: bool,
    certificate: tuple[Path, Path],
    make_settings: MakeSettings,
    aredis_db: redis.asyncio.Redis,
) -> None:
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    with SmtpServer(
        credentials=LOGIN, tls_context=server_tls(certificate), implicit_tls=implicit_tls
    ) as server:
        settings = make_settings(smtp_url=server.url(login=LOGIN))
        assert settings.smtp_url.startswith("smtps://" if implicit_tls else "smtp://")

        await mail(load_event(CANCELLED), settings, aredis_db, tls_context=trusting)

        assert [(r.login, r.tls) for r in server.received] == [("calhook", True)]


async def test_an_untrusted_certificate_is_permanent(
    certificate: tuple[Path, Path], make_settings: MakeSettings, aredis_db: redis.asyncio.Redis
) -> None:
    with SmtpServer(tls_context=server_tls(certificate)) as server:
        settings = make_settings(smtp_url=server.url())
        with pytest.raises(PermanentError, match="SSLCertVerificationError"):
            await mail(load_event(CANCELLED), settings, aredis_db)
        assert server.received == []


# The SMTP URL


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", SmtpUrl("mail.example.com", 25)),
        ("smtps://mail.example.com", SmtpUrl("mail.example.com", 465, implicit_tls=True)),
        (
            "smtp://u%40x:p%3Aw@mail.example.com:587?starttls=true&timeout=5",
            SmtpUrl("mail.example.com", 587, starttls=True, username="u@x", password="p:w",
                    timeout_s=5.0),
        ),
    ],
)  # fmt: skip
def test_smtp_urls(url: str, expected: SmtpUrl) -> None:
    assert SmtpUrl.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://mail.example.com", "scheme must be smtp:// or smtps://"),
        ("smtp://", "no host"),
        ("smtp://u:hunter2@mail.example.com:notaport", "not a valid URL"),
        ("smtp://mail.example.com?startls=true", "unknown option"),
        ("smtp://mail.example.com?starttls=maybe", "starttls must be true or false"),
        ("smtps://mail.example.com?starttls=true", "TLS already"),
    ],
)
def test_a_bad_smtp_url_names_the_setting_not_the_password(url: str, problem: str) -> None:
    with pytest.raises(SmtpUrlError, match=f"^CALHOOK_SMTP_URL: .*{problem}") as raised:
        SmtpUrl.parse(url)

    assert "hunter2" not in str(raised.value)
    assert "hunter2" not in repr(SmtpUrl.parse("smtp://u:hunter2@mail.example.com"))


# Chat


@pytest.fixture
def chat_settings(make_settings: MakeSettings, chat: ChatServer) -> Settings:
    return make_settings(chat_webhook_url=chat.url)


async def post(event: CalensoEvent, settings: Settings, client: redis.asyncio.Redis) -> bool:
    return await send_chat(event, context(CHAT_HANDLER), settings=settings, client=client)


async def test_a_chat_notice_is_the_bold_subject_and_the_body_posted_once(
    chat_settings: Settings, chat: ChatServer, aredis_db: redis.asyncio.Redis
) -> None:
    event = load_event(CANCELLED)

    assert await post(event, chat_settings, aredis_db) is True
    assert await post(event, chat_settings, aredis_db) is False  # a redelivery

    assert chat.calls == 1
    (body,) = chat.posts
    text = body["text"]
    assert text.startswith("*Storniert: Luca Brunner, 20.03.2025 14:00*\nDie Buchung von Luca")
    assert "Erstberatung" in text
    assert "Praxis Seefeld" in text


async def test_chat_text_cannot_mention_the_channel(
    chat_settings: Settings, chat: ChatServer, aredis_db: redis.asyncio.Redis
) -> None:
    event = load_event(CANCELLED, data(appointment__customer__prename="<!channel>"))

    await post(event, chat_settings, aredis_db)

    assert "*Storniert: &lt;!channel&gt; Brunner," in chat.posts[0]["text"]


async def test_chat_429_with_retry_after_asks_for_that_delay(
    chat_settings: Settings, chat: ChatServer, aredis_db: redis.asyncio.Redis
) -> None:
    chat.fail_next(429, headers={"Retry-After": "30"})

    with pytest.raises(Defer) as raised:
        await post(load_event(CANCELLED), chat_settings, aredis_db)

    assert raised.value.after_s == 30
    assert not await aredis_db.exists(posted_key(context(CHAT_HANDLER).idempotency_key))
    assert await post(load_event(CANCELLED), chat_settings, aredis_db) is True


@pytest.mark.parametrize(
    ("status", "error"),
    [(429, TransientError), (500, TransientError), (503, TransientError), (404, PermanentError),
     (400, PermanentError)],
)  # fmt: skip
async def test_chat_answers_map_to_retry_decisions(
    status: int,
    error: type[Exception],
    chat_settings: Settings,
    chat: ChatServer,
    aredis_db: redis.asyncio.Redis,
) -> None:
    chat.fail_next(status)

    with pytest.raises(error, match=f"chat webhook answered {status}") as raised:
        await post(load_event(CANCELLED), chat_settings, aredis_db)

    assert type(raised.value) is error
    assert chat.posts == []


async def test_an_unreachable_chat_is_transient(
    make_settings: MakeSettings, aredis_db: redis.asyncio.Redis
) -> None:
    settings = make_settings(chat_webhook_url=f"http://127.0.0.1:{free_port()}{WEBHOOK_PATH}")

    with pytest.raises(
        TransientError, match="chat webhook unreachable: ClientConnectorError"
    ) as raised:
        await post(load_event(CANCELLED), settings, aredis_db)

    assert WEBHOOK_PATH not in str(raised.value)
    assert raised.value.__context__ is None


# Logs


async def test_logs_hold_no_personal_data_and_no_webhook_url(
    mail_settings: MakeSettings,
    smtp: SmtpServer,
    chat: ChatServer,
    aredis_db: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = mail_settings(notify_to=f"{OPS},{BOSS},broken", chat_webhook_url=chat.url)
    event = load_event(CANCELLED)
    smtp.fail_next("rcpt", 550, after=1)
    chat.fail_next(500)

    with pytest.raises(PermanentError):
        await mail(event, settings, aredis_db)
    with pytest.raises(TransientError):
        await post(event, settings, aredis_db)
    await post(event, settings, aredis_db)
    await mail(load_event(CANCELLED), mail_settings(notify_staff=False, notify_to=""), aredis_db)

    # The test servers' own loggers are not calhook's; the clients' (aiohttp.client, aiosmtplib,
    # asyncio) are read with calhook's.
    servers = ("mail.", "aiohttp.server", "aiohttp.access", "aiohttp.web")
    ours = [r for r in caplog.records if not r.name.startswith(servers)]
    assert {r.name for r in ours} >= {"calhook.notify"}
    for record in ours:
        text = f"{record.getMessage()} {vars(record)}"
        for secret in (*PERSONAL, WEBHOOK_PATH, chat.url):
            assert secret not in text, (record.name, record.getMessage())


# Registration


def test_nothing_runs_unless_configured(make_settings: MakeSettings) -> None:
    registry = Registry()
    declare(registry)

    registry.activate(make_settings())

    assert len(registry) == 0
    assert {name: why for name, (_, why) in registry.inactive.items()} == {
        EMAIL_HANDLER: "not configured",
        CHAT_HANDLER: "not configured",
    }


def test_each_configured_channel_is_its_own_handler_on_the_notify_queue(
    make_settings: MakeSettings,
) -> None:
    registry = Registry()
    declare(registry)
    settings = make_settings(smtp_url="smtp://mail.example.com", chat_webhook_url="https://x/y")

    registry.activate(settings)

    assert [h.name for h in registry] == [EMAIL_HANDLER, CHAT_HANDLER]

    for name in (EMAIL_HANDLER, CHAT_HANDLER):
        registered = registry.get(name)
        assert registered.queue == NOTIFY_QUEUE
        assert registered.event_types == frozenset(NOTIFY_TYPES)
    assert set(NOTIFY_TYPES) == {
        "appointment.booking.cancelled",
        "event.booking.cancelled",
        "appointment.updated",
        "appointment.booking.payment_failed",
        "event.booking.payment_failed",
    }


def test_bad_configuration_fails_at_worker_start(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    registry = Registry()
    declare(registry)
    with pytest.raises(SmtpUrlError):
        registry.activate(make_settings(smtp_url="smtp://mail.example.com?tls=1"))

    write(tmp_path / "en" / "cancelled.txt", "Subject: $nope\n")
    settings = make_settings(chat_webhook_url="https://x/y", template_dir=str(tmp_path))
    registry = Registry()
    declare(registry)
    with pytest.raises(TemplateError, match=r"en/cancelled\.txt"):
        registry.activate(settings)
