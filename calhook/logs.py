"""Logging: one JSON object per line, or a readable line for `make run`.

Fields bound with :func:`bind` (``event_id``, ``type``, ``handler``, ``attempt`` …) appear on every
line logged in that context, from our code and from Celery's own loggers alike. Personal data is
never logged: callers log ids and masked values (:mod:`calhook.privacy`).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime as dt
import logging
import logging.handlers
import queue
import sys
from collections.abc import Iterator
from typing import Any

import orjson

# Never mutated in place: bind() sets a new dict, so the shared empty default is safe.
_EMPTY: dict[str, Any] = {}
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "calhook_log",
    default=_EMPTY,
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line written inside the ``with`` block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(_context.get())
    for key, value in vars(record).items():
        if key not in _RECORD_FIELDS and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the bound and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """``12:00:01 INFO  calhook.ingest accepted event_id=… type=…`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{ts} {record.levelname:<5} {record.name} {record.getMessage()}"
        if extras:
            text = f"{text}  {extras}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


class RedactMessageBodies(logging.Filter):
    """Cut the message body out of Celery's and kombu's complaints about a message, and task
    arguments out of Celery's task lines.

    On an unknown task or an undecodable message they log the full body, which holds the
    customer's name, e-mail and phone. Celery's "received"/"succeeded" lines carry the task's
    ``argsrepr``/``kwargsrepr`` in their ``data``: calhook's own messages set those to ids
    without personal data, but a message from another producer (a team's ``.delay()``) carries
    its real arguments there. Only calhook's own shape is kept.
    """

    _MARKERS = ("full contents of the message body", "body:")
    # ids, seq, handler: what calhook queues; event_id, type, attempt: what calhook 0.1 queued.
    _OWN_KEYS = frozenset({"ids", "seq", "handler", "event_id", "type", "attempt"})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("celery", "kombu")):
            data = getattr(record, "data", None)
            if isinstance(data, dict):
                record.data = {k: self._argument(k, v) for k, v in data.items()}
            text = record.getMessage()
            lowered = text.lower()
            for marker in self._MARKERS:
                cut = lowered.find(marker)
                if cut != -1:
                    record.msg = text[:cut] + "[message body redacted]"
                    record.args = None
                    break
        return True

    @classmethod
    def _argument(cls, key: str, value: object) -> object:
        if key not in ("args", "kwargs") or value in ("", "()", "{}", "[]", None):
            return value
        if key == "kwargs" and isinstance(value, str):
            try:
                parsed = orjson.loads(value)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and set(parsed) <= cls._OWN_KEYS:
                return value
        return "[arguments redacted]"


_listener: logging.handlers.QueueListener | None = None


def stop_background() -> None:
    """Write out what the background writer still holds, and stop it."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def configure(fmt: str = "json", level: str = "INFO", *, background: bool = False) -> None:
    """Send every logger's records to stderr in ``fmt``; replaces earlier handlers.

    ``background`` (the ingress) formats each line where it is logged but writes it from a
    thread, so a stalled log reader (a full pipe, a throttled journal) never blocks the event
    loop.
    """
    global _listener
    formatter = JsonFormatter() if fmt == "json" else ConsoleFormatter()
    stream = logging.StreamHandler(sys.stderr)
    handler: logging.Handler = stream
    if background:
        stop_background()
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        handler = logging.handlers.QueueHandler(lines)
        handler.setFormatter(formatter)  # formats in the caller: the bound fields are there
        stream.setFormatter(logging.Formatter("%(message)s"))
        _listener = logging.handlers.QueueListener(lines, stream)
        _listener.start()
        atexit.register(stop_background)
    else:
        stream.setFormatter(formatter)
    handler.addFilter(RedactMessageBodies())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log repeats what our own "accepted" line says, with less.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Celery's "received" and "succeeded" lines, two per task, repeat our own "dispatched" and
    # "handler done" (which carry the event id, handler, outcome and duration) and cost the
    # worker as much as the task; its failures are logged at ERROR and still pass.
    quiet = logging.DEBUG if logging.getLevelName(level) == logging.DEBUG else logging.WARNING
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(quiet)
    # httpx logs every request's URL at INFO; CRM URLs can carry an e-mail address.
    logging.getLogger("httpx").setLevel(logging.WARNING)
