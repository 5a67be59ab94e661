"""Shared fixtures: a real Redis, a real Celery worker process, the real ingress app."""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from calhook.redis_server import RedisServer
from calhook.settings import Settings, load_settings
from calhook.store.connect import pair_store
from calhook.store.keys import QUEUED, RUNNING, pairs_key
from calhook.store.pairs import PairStore
from ingest import create_app
from tests.support.chat_server import ChatServer
from tests.support.fake_crm import TOKEN as CRM_TOKEN
from tests.support.fake_crm import FakeCrm
from tests.support.leaks import LeakScan, personal_data
from tests.support.recording import RECORD_QUEUE
from tests.support.smtp_server import SmtpServer
from tests.support.store import quiet_database
from tests.support.waiting import wait_for
from tests.support.worker import TEST_HANDLER_MODULES, SchedulerProcess, WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "calenso"
SECRET = "test-webhook-token-0001"
ALL_QUEUES = ("dispatch", "audit", "crm", "notify", RECORD_QUEUE)
# The database calhook.testing's harness empties and uses (tests/test_testing.py).
HARNESS_DB = 11
OPS_MAILBOX = "ops@example.com"


def fixture_files() -> list[Path]:
    """Every Calenso sample payload, current and planned, nested and flat."""
    files = sorted(FIXTURES.glob("*.json")) + sorted((FIXTURES / "planned").glob("*.json"))
    return [f for f in files if f.name != "request.example.json"]


_SESSION_SCANS: list[LeakScan] = []


@pytest.fixture(scope="session", autouse=True)
def personal_data_stays_out_of_logs() -> Iterator[LeakScan]:
    """Fail the session if a log line of it shows a fixture's e-mail, phone, name or address.

    Every record of every in-process logger reaches this root handler (calhook's loggers at
    DEBUG for the session, so that nothing calhook could log goes unread); the log files of the
    processes tests start (tests/support/worker.py registers them) are read at the end.
    """
    scan = LeakScan(personal_data(fixture_files()))
    _SESSION_SCANS.append(scan)
    root, ours = logging.getLogger(), logging.getLogger("calhook")
    level = ours.level
    ours.setLevel(logging.DEBUG)
    root.addHandler(scan)
    yield scan
    root.removeHandler(scan)
    ours.setLevel(level)
    scan.scan_registered()
    if scan.leaks:
        pytest.fail(
            f"personal data of the fixtures in the logs of this session:\n{scan.report()}",
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the known, explained leaks the session's scan saw (they do not fail the run)."""
    by_reason: dict[str, list[str]] = {}
    for scan in _SESSION_SCANS:
        for finding in scan.findings:
            if finding.known is not None:
                where = f"{finding.needle.kind} {finding.needle.masked} in {finding.where}"
                by_reason.setdefault(finding.known.reason, []).append(where)
    if by_reason:
        terminalreporter.section("known personal-data leaks in logs")
        for reason, places in by_reason.items():
            terminalreporter.line(f"{reason}:")
            for where in places:
                terminalreporter.line(f"  - {where}")


@pytest.fixture(autouse=True)
def _leak_scan_installed(personal_data_stays_out_of_logs: LeakScan) -> None:
    """Put the scan back on the root logger if a test replaced the root handlers."""
    root = logging.getLogger()
    if personal_data_stays_out_of_logs not in root.handlers:
        root.addHandler(personal_data_stays_out_of_logs)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when set (the tests flush that database!), else an embedded server of our own."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def calhook_redis_url(redis_url: str) -> str:
    """calhook.testing's harness runs on a database of the test Redis no worker reads (it
    empties it each run), emptied here once: what an earlier session left is not its own."""
    url = urllib.parse.urlsplit(redis_url)._replace(path=f"/{HARNESS_DB}").geturl()
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[redis.Redis]:
    """A client on an empty database."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def aredis_db(redis_db: redis.Redis, redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client on the same (emptied) database, for code that runs on an event loop."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


Client = TestClient[Any, Any]


@pytest.fixture
def pairs(redis_db: redis.Redis, make_settings: Callable[..., Settings]) -> PairStore:
    """The pair store on the test database, with default timings."""
    return pair_store(redis_db, make_settings())


@pytest.fixture
def quiet_url(redis_url: str) -> Iterator[str]:
    """Another database of the test Redis, out of reach of the session's worker: what the
    transitions queue there stays queued while a test moves its pairs by hand."""
    with quiet_database(redis_url) as url:
        yield url


@pytest.fixture
def quiet_db(quiet_url: str) -> Iterator[redis.Redis]:
    """A client on :func:`quiet_url`."""
    client = redis.Redis.from_url(quiet_url)
    yield client
    client.close()


@pytest.fixture
def quiet_pairs(
    quiet_db: redis.Redis, quiet_url: str, make_settings: Callable[..., Settings]
) -> PairStore:
    """The pair store on :func:`quiet_url`: states laid out there stay as laid out."""
    return pair_store(quiet_db, make_settings(redis_url=quiet_url))


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> Client:
    """The real ingress app, on the test Redis, with the test secret."""
    return await aiohttp_client(create_app(make_settings()))


@pytest.fixture
def make_settings(redis_url: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for tests: the test Redis, a known secret, a spool of its own, and overrides."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "auth_secrets": SECRET,
            "spool_dir": str(tmp_path / "spool"),
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture(scope="session")
def fake_crm_server() -> Iterator[FakeCrm]:
    """A CRM bridge on localhost speaking the http contract, for the session's worker."""
    server = FakeCrm().start()
    yield server
    server.stop()


@pytest.fixture
def fake_crm(fake_crm_server: FakeCrm) -> FakeCrm:
    """The session's fake CRM, emptied."""
    fake_crm_server.reset()
    return fake_crm_server


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    """A mail server on localhost recording what the session's worker sends."""
    with SmtpServer() as server:
        yield server


@pytest.fixture(scope="session")
def chat_server() -> Iterator[ChatServer]:
    """A Slack-compatible webhook receiver on localhost for the session's worker."""
    with ChatServer() as server:
        yield server


@pytest.fixture(scope="session")
def worker_process(
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    fake_crm_server: FakeCrm,
    smtp_server: SmtpServer,
    chat_server: ChatServer,
) -> Iterator[WorkerProcess]:
    """One real worker for the session, consuming every queue, and a scheduler beside it."""
    logs = tmp_path_factory.mktemp("pipeline")
    integrations = {
        "CALHOOK_HANDLER_MODULES": f"{TEST_HANDLER_MODULES},workers.tasks.crm,workers.tasks.notify",
        "CALHOOK_CRM_KIND": "http",
        "CALHOOK_CRM_URL": fake_crm_server.url,
        "CALHOOK_CRM_TOKEN": CRM_TOKEN,
        "CALHOOK_CRM_RATE_PER_S": "1000",
        "CALHOOK_SMTP_URL": smtp_server.url(),
        "CALHOOK_NOTIFY_FROM": "calhook@example.com",
        "CALHOOK_NOTIFY_TO": OPS_MAILBOX,
        "CALHOOK_CHAT_WEBHOOK_URL": chat_server.url,
    }
    worker = WorkerProcess(redis_url, logs / "worker.log", 2, **integrations)
    scheduler = SchedulerProcess(redis_url, logs / "scheduler.log")
    worker.start()
    scheduler.start()
    yield worker
    scheduler.stop()
    worker.stop()


def queues_drained(client: redis.Redis) -> bool:
    """True when no message waits or is in flight on any queue, and no pair is queued or
    running (pairs waiting for a retry may remain)."""
    waiting = sum(int(client.llen(q)) for q in ALL_QUEUES)
    open_pairs = sum(int(n) for state in (QUEUED, RUNNING) for n in client.hvals(pairs_key(state)))
    return waiting == 0 and int(client.hlen("unacked")) == 0 and open_pairs == 0


@pytest.fixture
def worker(worker_process: WorkerProcess, redis_db: redis.Redis) -> Iterator[WorkerProcess]:
    """The session's worker, on an empty database; the test ends with the queues drained."""
    yield worker_process
    wait_for(lambda: queues_drained(redis_db), timeout_s=30, what="queues to drain")
