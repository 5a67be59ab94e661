"""Operational notices: every transition of the store told once to chat, e-mail and a signed URL.

The transitions are made by the store's real scripts (``calhook.store.health`` and
``tests/support/store.py``, as in ``tests/workers/test_health.py``) on a database no worker reads;
the receivers are real servers on localhost: the chat webhook and SMTP server the suite uses, and
an operator's endpoint defined here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio
from aiohttp import web

from calhook.settings import Settings, SettingsError
from calhook.store.health import Health
from calhook.store.keys import DEAD, NOTICES
from calhook.store.pairs import Ending, PairStore
from calhook.store.queues import throughput_key
from tests.support.chat_server import ChatServer
from tests.support.smtp_server import SmtpServer
from tests.support.store import OWNER, accept, dead_letter, route
from tests.support.threaded import ThreadedServer
from tests.support.waiting import Timeout, wait_for
from workers.notices import (
    GROUP,
    Notice,
    NoticeLoop,
    channels_of,
    check_dead_letters,
    start_notices,
)
from workers.notify.mail import message_id
from workers.scheduler import run_scheduler

H, Q = "crm.sync_customer", "crm"
CHAT_H, CHAT_Q = "notify.chat", "notify"
BREAKER = {"c": H, "h": [H], "n": 3, "w": 60_000, "p": 30_000, "m": 120_000}
KEY = b"calhook-notices-test-key-0123456"
WHSEC = "whsec_" + base64.b64encode(KEY).decode()
NOTICE_TO = ("oncall@example.com", "ops-notices@example.com")
SENDER = "calhook <calhook@example.com>"
HOOK_PATH = "/hooks/calhook"

MakeSettings = Callable[..., Settings]


class Receiver:
    """An operator's endpoint for the signed notices: records each accepted POST (headers and
    raw body), can refuse the next calls with a status, or hold every answer until released."""

    def __init__(self) -> None:
        self._posts: list[tuple[dict[str, str], bytes]] = []
        self._calls = 0
        self._faults: deque[int] = deque()
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        app = web.Application()
        app.router.add_post(HOOK_PATH, self._handle)
        self._server = ThreadedServer(app, shutdown_timeout=1.0)

    @property
    def url(self) -> str:
        return f"{self._server.url}{HOOK_PATH}"

    def fail_next(self, status: int, times: int = 1) -> None:
        with self._lock:
            self._faults.extend([status] * times)

    @property
    def posts(self) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return list(self._posts)

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self._calls += 1
        if not self.gate.is_set():
            await asyncio.to_thread(self.gate.wait, 30)
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            if fault is None:
                self._posts.append(({k.lower(): v for k, v in request.headers.items()}, body))
        if fault is not None:
            return web.Response(status=fault, text="test_fault")
        return web.Response(status=204)

    def __enter__(self) -> Receiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    with ChatServer() as server:
        yield server


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def notice_settings(
    make_settings: MakeSettings,
    quiet_url: str,
    chat: ChatServer,
    smtp: SmtpServer,
    receiver: Receiver,
) -> MakeSettings:
    """Settings with all three channels, on the quiet database; keyword overrides."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": quiet_url,
            "chat_webhook_url": chat.url,
            "smtp_url": smtp.url(),
            "notify_from": SENDER,
            "notice_email": ",".join(NOTICE_TO),
            "notice_url": receiver.url,
            "notice_secret": WHSEC,
        }
        return make_settings(**{**values, **overrides})

    return make


@pytest.fixture
async def aquiet(quiet_url: str, quiet_db: redis.Redis) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(quiet_url)
    yield client
    await client.aclose()


@pytest.fixture
def health(quiet_pairs: PairStore) -> Health:
    return Health(quiet_pairs.scripts)


def _routed(pairs: PairStore, handler: str = H, queue: str = Q) -> str:
    event_id = accept(pairs, f'{{"n": "{time.monotonic_ns()}"}}'.encode())
    route(pairs, event_id, [(handler, queue)])
    return event_id


def _run(pairs: PairStore, event_id: str, ending: Ending) -> None:
    started = pairs.start(H, [event_id], OWNER, max_starts=5, seq=None, queue=Q, defer_s=1.0)
    assert [s.what for s in started] == ["run"]
    pairs.finish(H, OWNER, throughput_key(Q), [ending])


def _transient(event_id: str, *, breaker: bool = True) -> Ending:
    return Ending(
        event_id,
        "retry",
        "retry_scheduled",
        delay_s=0.0,
        error="CrmUnavailable: HubSpot answered 503",
        gist="CrmUnavailable: HubSpot answered 503",
        breaker=BREAKER if breaker else None,
    )


def every_transition(pairs: PairStore, health: Health, db: redis.Redis) -> None:
    """Make each kind of notice through the store: a breaker and a failure group open, an
    operator pauses and resumes the handler (closing the breaker), its next success closes the
    group; another handler's permanent failure opens a group that is resolved; the dead letters
    cross a threshold of 1 up and back down. (A group of retried failures is told at its fifth:
    two of them are counted without the breaker first.)"""
    for n in range(5):
        event_id = _routed(pairs)
        _run(pairs, event_id, _transient(event_id, breaker=n >= 2))
    health.pause(H, reason="HubSpot maintenance", by="ops")
    health.resume(H, by="ops")
    event_id = _routed(pairs)
    _run(pairs, event_id, Ending(event_id, "done", "ok"))
    dead_id = accept(pairs, b'{"dead": true}')
    dead_letter(pairs, dead_id, CHAT_H, CHAT_Q, error="ChatRejected: the webhook answered 404")
    (group,) = health.groups(states=("open",))
    health.resolve(group.id, by="ops")
    assert check_dead_letters(db, 1) == "above"
    assert pairs.purge("dead", [f"{dead_id}.{CHAT_H}"]) == 1
    assert check_dead_letters(db, 1) == "below"


def entries(db: redis.Redis) -> list[Notice]:
    raw: Any = db.xrange(NOTICES)
    return [Notice.from_entry(i.decode(), f) for i, f in raw]


def settled(db: redis.Redis) -> bool:
    """Every entry of the stream read by the group, and none pending."""
    if not db.exists(NOTICES) or not db.xinfo_groups(NOTICES):
        return False
    last = db.xinfo_stream(NOTICES)["last-generated-id"]
    (group,) = db.xinfo_groups(NOTICES)
    return bool(group["pending"] == 0 and group["last-delivered-id"] == last)


async def step_until(loops: list[NoticeLoop], db: redis.Redis, timeout_s: float = 20.0) -> None:
    """Step the loops until every notice is delivered (or dropped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for loop in loops:
            await loop.step()
        if settled(db):
            return
        if time.monotonic() > deadline:
            raise Timeout(f"notices not all delivered after {timeout_s}s")
        await asyncio.sleep(0.02)


def verify(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """Check a Standard Webhooks signature as a receiver would, without calhook's code."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(base64.b64decode(WHSEC.removeprefix("whsec_")), signed, hashlib.sha256)
    assert headers["webhook-signature"] == "v1," + base64.b64encode(digest.digest()).decode()
    assert abs(int(timestamp) - time.time()) < 60
    payload: dict[str, Any] = json.loads(body)
    return payload


# Every kind, every channel, once


async def test_each_kind_of_transition_is_told_once_on_every_channel(
    notice_settings: MakeSettings,
    quiet_pairs: PairStore,
    quiet_db: redis.Redis,
    health: Health,
    aquiet: redis.asyncio.Redis,
    chat: ChatServer,
    smtp: SmtpServer,
    receiver: Receiver,
) -> None:
    loop = NoticeLoop(aquiet, channels_of(notice_settings()))
    await loop.setup()
    every_transition(quiet_pairs, health, quiet_db)
    notices = entries(quiet_db)
    assert Counter(n.kind for n in notices) == {
        "group_opened": 2,
        "breaker_opened": 1,
        "handler_paused": 1,
        "breaker_closed": 1,
        "handler_resumed": 1,
        "group_closed": 1,
        "group_resolved": 1,
        "dead_letters_above": 1,
        "dead_letters_below": 1,
    }

    await step_until([loop], quiet_db)
    for _ in range(3):
        await loop.step()

    assert [p["text"] for p in chat.posts] == [n.line(chat=True) for n in notices]
    assert sorted(smtp.delivered_to()) == sorted(NOTICE_TO * len(notices))
    for notice in notices:
        for recipient in NOTICE_TO:
            (mail,) = [
                r.message
                for r in smtp.received
                if r.message["Message-ID"] == message_id(notice.key, recipient)
            ]
            assert mail["Subject"] == f"[calhook] {notice.kind}: {notice.subject}"
            assert mail.get_content().strip() == notice.line()
    assert [h["webhook-id"] for h, _ in receiver.posts] == [n.id for n in notices]
    for (headers, body), notice in zip(receiver.posts, notices, strict=True):
        payload = verify(headers, body)
        assert payload["type"] == f"calhook.{notice.kind}"
        assert payload["data"]["text"] == notice.text
        assert payload["data"]["subject"] == notice.subject
        assert abs(datetime.fromisoformat(payload["timestamp"]).timestamp() - notice.at) < 0.001
    assert (chat.calls, receiver.calls) == (len(notices), len(notices))


def test_the_lines_say_what_happened_and_what_to_run(
    quiet_pairs: PairStore, quiet_db: redis.Redis, health: Health
) -> None:
    every_transition(quiet_pairs, health, quiet_db)
    by_kind = {n.kind: n for n in entries(quiet_db)}

    paused = by_kind["handler_paused"]
    assert paused.line() == (
        f"[calhook] handler_paused | {paused.when} | crm.sync_customer paused by ops: HubSpot "
        "maintenance | next: calhook handlers resume crm.sync_customer"
    )
    opened = by_kind["breaker_opened"]
    assert opened.line().endswith(
        "crm.sync_customer: 3 failures in a row (CrmUnavailable); holding crm.sync_customer"
        " | next: calhook handlers list (it closes by itself at the first probe that succeeds;"
        " `calhook handlers pause` stops the probes)"
    )
    resolved = by_kind["group_resolved"]
    assert resolved.line().endswith(f"next: calhook failures show {resolved.data['group']}")
    assert resolved.data["handler"] == CHAT_H
    above = by_kind["dead_letters_above"]
    assert above.line() == (
        f"[calhook] dead_letters_above | {above.when} | dead letters: 1, at or above the "
        "threshold of 1 | next: calhook dlq list"
    )
    assert paused.line(chat=True) == (
        f"*handler_paused* | {paused.when} | crm.sync_customer paused by ops: HubSpot "
        "maintenance | next: `calhook handlers resume crm.sync_customer`"
    )


# Retries


@pytest.mark.parametrize("failing", ["chat", "email", "url"])
async def test_a_receiver_failing_twice_gets_the_notice_once_and_the_others_once(
    failing: str,
    notice_settings: MakeSettings,
    health: Health,
    quiet_db: redis.Redis,
    aquiet: redis.asyncio.Redis,
    chat: ChatServer,
    smtp: SmtpServer,
    receiver: Receiver,
) -> None:
    if failing == "chat":
        chat.fail_next(500, times=2)
    elif failing == "email":
        smtp.fail_next("rcpt", 451, times=2)
    else:
        receiver.fail_next(503, times=2)
    loop = NoticeLoop(aquiet, channels_of(notice_settings()), claim_idle_s=0.2)
    await loop.setup()
    health.pause(H, reason="HubSpot maintenance", by="ops")

    assert await loop.step() == 0
    await step_until([loop], quiet_db)
    # Nothing is pending any more: later steps send nothing.
    for _ in range(3):
        await loop.step()

    (notice,) = entries(quiet_db)
    assert [p["text"] for p in chat.posts] == [notice.line(chat=True)]
    assert sorted(smtp.delivered_to()) == sorted(NOTICE_TO)
    assert [h["webhook-id"] for h, _ in receiver.posts] == [notice.id]
    calls = {"chat": chat.calls, "url": receiver.calls}
    expected = {"chat": 1, "url": 1}
    if failing in expected:
        expected[failing] = 3
    assert calls == expected


async def test_the_notices_a_dead_scheduler_took_are_taken_over(
    notice_settings: MakeSettings,
    health: Health,
    quiet_db: redis.Redis,
    aquiet: redis.asyncio.Redis,
    chat: ChatServer,
) -> None:
    channels = channels_of(notice_settings(notice_email="", notice_url="", notice_secret=""))
    dead = NoticeLoop(aquiet, channels, consumer="dead-scheduler")
    await dead.setup()
    health.pause(H, by="ops")
    # It read the entry and died before sending it.
    assert await aquiet.xreadgroup(GROUP, "dead-scheduler", {NOTICES: ">"}, count=1)
    alive = NoticeLoop(aquiet, channels, claim_idle_s=0.2)

    await step_until([alive], quiet_db)

    (notice,) = entries(quiet_db)
    assert [p["text"] for p in chat.posts] == [notice.line(chat=True)]


async def test_a_notice_failing_for_longer_than_a_day_is_dropped(
    notice_settings: MakeSettings,
    health: Health,
    quiet_db: redis.Redis,
    aquiet: redis.asyncio.Redis,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.fail_next(503, times=1000)
    settings = notice_settings(notice_chat=False, notice_email="")
    # A "day" of half a second.
    loop = NoticeLoop(aquiet, channels_of(settings), claim_idle_s=0.1, give_up_s=0.5)
    await loop.setup()
    health.pause(H)

    with caplog.at_level(logging.ERROR, logger="calhook.notices"):
        await step_until([loop], quiet_db)

    assert receiver.calls >= 2
    assert receiver.posts == []
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "notice not delivered within a day, dropped"


# Several schedulers


def test_two_loops_at_once_deliver_each_notice_once(
    notice_settings: MakeSettings,
    health: Health,
    quiet_db: redis.Redis,
    chat: ChatServer,
    smtp: SmtpServer,
    receiver: Receiver,
) -> None:
    settings = notice_settings()
    stop = threading.Event()
    threads = [start_notices(quiet_db, settings, stop) for _ in range(2)]
    try:
        for i in range(15):
            health.pause(f"h{i}", by="ops")
            health.resume(f"h{i}", by="ops")
        wait_for(lambda: len(chat.posts) >= 30 and settled(quiet_db), what="30 notices")
    finally:
        stop.set()
        for thread in threads:
            assert thread is not None
            thread.join(10)

    notices = entries(quiet_db)
    assert len(notices) == 30
    assert sorted(p["text"] for p in chat.posts) == sorted(n.line(chat=True) for n in notices)
    assert len(smtp.received) == 60
    assert len({r.message["Message-ID"] for r in smtp.received}) == 60
    assert sorted(h["webhook-id"] for h, _ in receiver.posts) == sorted(n.id for n in notices)
    assert (chat.calls, receiver.calls) == (30, 30)
    # Both left the group once done.
    assert quiet_db.xinfo_consumers(NOTICES, GROUP) == []


def test_the_dead_letter_threshold_is_told_once_up_and_once_down_fleet_wide(
    quiet_pairs: PairStore, quiet_db: redis.Redis, quiet_url: str
) -> None:
    other = redis.Redis.from_url(quiet_url)
    dead: list[str] = []

    def two_schedulers() -> list[str | None]:
        crossed: list[str | None] = []
        threads = [
            threading.Thread(target=lambda c=c: crossed.append(check_dead_letters(c, 3)))
            for c in (quiet_db, other)
            for _ in range(5)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [c for c in crossed if c]

    try:
        # Below at the first look: nothing to tell.
        assert two_schedulers() == []
        for _ in range(4):
            dead.append(accept(quiet_pairs, f'{{"d": {len(dead)}}}'.encode()))
            dead_letter(quiet_pairs, dead[-1], CHAT_H, CHAT_Q)
            assert two_schedulers() == (["above"] if len(dead) == 3 else [])
        assert quiet_pairs.purge("dead", [f"{e}.{CHAT_H}" for e in dead[:2]]) == 2
        assert two_schedulers() == ["below"]
        assert two_schedulers() == []
    finally:
        other.close()

    told = [(n.kind, n.data) for n in entries(quiet_db) if n.kind.startswith("dead_letters_")]
    assert told == [
        ("dead_letters_above", {"count": 3, "threshold": 3}),
        ("dead_letters_below", {"count": 2, "threshold": 3}),
    ]
    assert check_dead_letters(quiet_db, 0) is None
    assert quiet_db.zcard(DEAD) == 2


def test_the_scheduler_sends_notices_without_waiting_for_a_slow_receiver(
    notice_settings: MakeSettings,
    quiet_pairs: PairStore,
    quiet_db: redis.Redis,
    health: Health,
    receiver: Receiver,
) -> None:
    settings = notice_settings(
        notice_chat=False, notice_email="", notice_dead_letters=1, scheduler_interval_s=0.05
    )
    receiver.gate.clear()
    stop = threading.Event()
    scheduler = threading.Thread(target=run_scheduler, args=(quiet_pairs, settings, stop))
    scheduler.start()
    try:
        health.pause(H, by="ops")
        wait_for(lambda: receiver.calls == 1, what="the pause notice on its way")
        # The receiver holds it; the scheduler's ticks go on and tell the dead letters.
        dead_id = accept(quiet_pairs, b'{"dead": 1}')
        dead_letter(quiet_pairs, dead_id, CHAT_H, CHAT_Q)
        wait_for(
            lambda: "dead_letters_above" in [n.kind for n in entries(quiet_db)],
            what="the dead-letter notice",
        )
        assert receiver.posts == []
        receiver.gate.set()
        wait_for(lambda: len(receiver.posts) == 3 and settled(quiet_db), what="all notices")
    finally:
        receiver.gate.set()
        stop.set()
        scheduler.join(15)
    assert not scheduler.is_alive()
    kinds = [json.loads(body)["type"] for _, body in receiver.posts]
    assert sorted(kinds) == [
        "calhook.dead_letters_above",
        "calhook.group_opened",
        "calhook.handler_paused",
    ]


# Settings


def test_notices_go_to_the_chat_by_default_when_it_is_configured(
    make_settings: MakeSettings, chat: ChatServer
) -> None:
    assert make_settings(chat_webhook_url=chat.url).notices_to_chat
    assert not make_settings(chat_webhook_url=chat.url, notice_chat=False).notices_to_chat
    assert not make_settings().notices_to_chat
    assert channels_of(make_settings()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"notice_url": "https://ops.example.com/hook", "notice_secret": "s3cr3t-plain"},
            "CALHOOK_NOTICE_SECRET: Value error, a standard-webhooks secret must start with whsec_",
        ),
        (
            {"notice_url": "https://ops.example.com/hook", "notice_secret": "whsec_***"},
            "CALHOOK_NOTICE_SECRET: Value error, a standard-webhooks secret must be whsec_ "
            "followed by base64",
        ),
        (
            {"notice_url": "https://ops.example.com/hook"},
            "CALHOOK_NOTICE_URL is set but CALHOOK_NOTICE_SECRET is empty",
        ),
        (
            {"notice_url": "ftp://ops.example.com/hook", "notice_secret": WHSEC},
            "CALHOOK_NOTICE_URL: Value error, must be an http:// or https:// URL",
        ),
        (
            {"notice_email": "oncall@example.com"},
            "CALHOOK_NOTICE_EMAIL is set but CALHOOK_SMTP_URL is empty",
        ),
        (
            {"notice_email": "oncall", "smtp_url": "smtp://127.0.0.1:25"},
            "CALHOOK_NOTICE_EMAIL: Value error, each address must be name@domain",
        ),
        (
            {"notice_chat": True},
            "CALHOOK_NOTICE_CHAT is true but CALHOOK_CHAT_WEBHOOK_URL is empty",
        ),
    ],
)
def test_unusable_notice_settings_are_named_at_load(
    make_settings: MakeSettings, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        make_settings(**overrides)
    assert message in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_an_unusable_smtp_url_leaves_out_only_the_e_mail_channel(
    notice_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = notice_settings(smtp_url="smtp://mail.example.org:notaport")
    with caplog.at_level(logging.ERROR, logger="calhook.notices"):
        channels = channels_of(settings)
    assert len(channels) == 2  # the chat and the signed URL; the scheduler runs on
    assert [r.getMessage() for r in caplog.records] == ["operational notices by e-mail are off"]


async def test_a_new_group_starts_an_hour_back(
    notice_settings: MakeSettings,
    quiet_db: redis.Redis,
    aquiet: redis.asyncio.Redis,
    receiver: Receiver,
) -> None:
    # Given a stream that ran long before anyone sent notices: one entry of two hours ago, one
    # of ten minutes ago
    now_ms = int(time.time() * 1000)
    for ago_s, text in ((7200, "long ago"), (600, "just now")):
        quiet_db.xadd(
            NOTICES,
            {"kind": "handler_paused", "subject": H, "text": text, "at": "0", "data": "{}"},
            id=f"{now_ms - ago_s * 1000}-0",
        )
    settings = notice_settings(notice_chat=False, notice_email="")
    loop = NoticeLoop(aquiet, channels_of(settings))

    # When the first scheduler reads
    await loop.setup()
    await step_until([loop], quiet_db)

    # Then only the recent one is told
    assert [orjson.loads(body)["data"]["text"] for _, body in receiver.posts] == ["just now"]
