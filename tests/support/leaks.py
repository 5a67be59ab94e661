"""The fixtures' personal data, and a scan of log output for it (DESIGN.md rule 7, issue 7).

:func:`personal_data` collects, from every Calenso fixture, the values specific enough to be
unmistakable in a log: e-mail addresses (also URL-encoded), full names (first and last name of
one person), phone numbers (their digits, with or without the country code, spaces allowed) and
people's street addresses. A :class:`LeakScan` is a logging handler that checks every record it
sees (formatted the way calhook formats its lines, after calhook's own redaction) and, at its
end, every log file of the subprocesses the tests started (:func:`register_log`). Findings name
the value masked, never in full.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calhook.logs import JsonFormatter, RedactMessageBodies
from calhook.privacy import mask_email, mask_phone

# Log files of the processes tests started (workers, schedulers, ingresses), scanned at the end.
_LOG_FILES: list[Path] = []
_LOG_FILES_LOCK = threading.Lock()

# In-process loggers of the tests' own fake servers, not calhook's: aiosmtpd (the SMTP server
# tests/support/smtp_server.py runs) logs every envelope it receives, recipients included.
FAKE_SERVER_LOGGERS = ("mail.log",)


@dataclass(frozen=True)
class KnownLeak:
    """A leak known and explained, reported but not failed on: a logger and a text it holds."""

    logger: str
    contains: str
    reason: str


# Leaks known and explained; empty since calhook.logs keeps task arguments out of Celery's lines.
KNOWN_LEAKS: tuple[KnownLeak, ...] = ()

_PERSON_KEYS = ("prename", "lastname", "email", "phone", "mobile", "street", "full_name")


@dataclass(frozen=True)
class Needle:
    """One personal value: what it is, how it is shown masked, and how it is found."""

    kind: str
    masked: str
    pattern: str


@dataclass(frozen=True)
class Finding:
    """A personal value found in a log: which one (masked), where, and whether it is known."""

    needle: Needle
    where: str
    known: KnownLeak | None = None

    def __str__(self) -> str:
        text = f"{self.needle.kind} {self.needle.masked} in {self.where}"
        return f"{text} [known: {self.known.reason}]" if self.known else text


def register_log(path: Path) -> None:
    """Have the session's leak scan read ``path`` (a subprocess's log) at the end."""
    with _LOG_FILES_LOCK:
        if path not in _LOG_FILES:
            _LOG_FILES.append(path)


def registered_logs() -> list[Path]:
    with _LOG_FILES_LOCK:
        return list(_LOG_FILES)


def _mask_name(name: str) -> str:
    return " ".join(f"{part[:1]}***" for part in name.split())


def _email(value: str) -> Needle:
    local, _, domain = value.partition("@")
    pattern = f"{re.escape(local)}(?:@|%40){re.escape(domain)}"
    return Needle("e-mail", mask_email(value) or "***", pattern)


def _phone(value: str) -> Needle | None:
    digits = re.sub(r"\D", "", value)
    if len(digits) < 9:
        return None
    national = digits[-9:]
    spaced = r"[ ]?".join(national)
    # +41 79 000 01 42, 0041790000142, 079 000 01 42, 790000142 glued to a 41: all the same phone.
    pattern = rf"(?<!\d)(?:(?:\+|00)?{digits[:-9]}[ ]?|0)?{spaced}(?!\d)"
    return Needle("phone", mask_phone(value) or "***", pattern)


def _name(first: str, last: str) -> Needle:
    pattern = rf"\b{re.escape(first)}\s+{re.escape(last)}\b"
    return Needle("name", _mask_name(f"{first} {last}"), pattern)


def _full_name(value: str) -> Needle | None:
    parts = value.split()
    if len(parts) < 2:
        return None
    return _name(" ".join(parts[:-1]), parts[-1])


def _street(value: str) -> Needle | None:
    if not re.search(r"\d", value) or len(value) < 6:
        return None  # "Bahnhofstrasse" alone is no address
    return Needle("address", f"{value[:1]}*** {value.split()[-1]}", rf"\b{re.escape(value)}\b")


def _groups(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each person-like object, nested (a dict) or flat (keys sharing a prefix)."""
    flat: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _groups(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from _groups(item)
        else:
            for field in _PERSON_KEYS:
                if key == field or key.endswith((f"_{field}", f".{field}")):
                    flat.setdefault(key[: len(key) - len(field)], {})[field] = value
    yield from flat.values()


def personal_data(files: Iterable[Path]) -> list[Needle]:
    """The unmistakable personal values of the fixture ``files``, each once."""
    found: dict[str, Needle] = {}
    for path in files:
        for person in _groups(json.loads(path.read_bytes())):
            candidates: list[Needle | None] = []
            first, last = person.get("prename"), person.get("lastname")
            if isinstance(first, str) and isinstance(last, str) and first and last:
                candidates.append(_name(first, last))
            if isinstance(person.get("full_name"), str):
                candidates.append(_full_name(person["full_name"]))
            if isinstance(person.get("email"), str) and "@" in person["email"]:
                candidates.append(_email(person["email"]))
            for key in ("phone", "mobile"):
                if isinstance(person.get(key), str):
                    candidates.append(_phone(person[key]))
            # A street is a person's address only beside a person's name or e-mail.
            is_person = any(k in person for k in ("prename", "lastname", "email"))
            if isinstance(person.get("street"), str) and is_person:
                candidates.append(_street(person["street"]))
            for needle in candidates:
                if needle is not None:
                    found.setdefault(needle.pattern, needle)
    return list(found.values())


class LeakScan(logging.Handler):
    """A handler that looks for personal values in every record, and then in the log files."""

    def __init__(self, needles: Iterable[Needle]) -> None:
        super().__init__(logging.NOTSET)
        self.needles = list(needles)
        self._by_group = {f"n{i}": n for i, n in enumerate(self.needles)}
        alternation = "|".join(f"(?P<{g}>{n.pattern})" for g, n in self._by_group.items())
        self._regex = re.compile(alternation or r"(?!x)x", re.IGNORECASE)
        self._formatter = JsonFormatter()
        self._redact = RedactMessageBodies()
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, str]] = set()
        self._scanned: dict[Path, int] = {}

    def search(self, text: str) -> list[Needle]:
        """The needles ``text`` contains."""
        hits = []
        for match in self._regex.finditer(text):
            group = match.lastgroup
            if group is not None:
                hits.append(self._by_group[group])
        return hits

    def _note(self, needle: Needle, where: str, logger: str, text: str) -> None:
        key = (needle.pattern, where)
        if key not in self._seen:
            self._seen.add(key)
            known = next(
                (k for k in KNOWN_LEAKS if k.logger == logger and k.contains in text), None
            )
            self.findings.append(Finding(needle, where, known))

    @property
    def leaks(self) -> list[Finding]:
        """The findings no known leak explains."""
        return [f for f in self.findings if f.known is None]

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(FAKE_SERVER_LOGGERS):
            return
        # A copy: calhook's redaction rewrites the record, and other handlers see the original.
        seen = copy.copy(record)
        try:
            self._redact.filter(seen)
            text = self._formatter.format(seen)
        except Exception:
            text = f"{record.msg!r} {record.args!r}"
        for needle in self.search(text):
            test = os.environ.get("PYTEST_CURRENT_TEST", "outside a test")
            where = f"a {record.levelname} record of logger {record.name} ({test})"
            self._note(needle, where, record.name, text)

    def scan_file(self, path: Path, start: int | None = None) -> None:
        """Look through ``path`` from ``start``, or from where the last scan of it stopped."""
        try:
            with path.open("rb") as log:
                log.seek(self._scanned.get(path, 0) if start is None else start)
                lines = log.read().decode("utf-8", "replace")
                self._scanned[path] = log.tell()
        except FileNotFoundError:
            return
        for number, line in enumerate(lines.splitlines(), start=1):
            for needle in self.search(line):
                logger = re.search(r'"logger":\s*"([^"]*)"', line)
                where = f"{path} (line {number} of the part read)"
                self._note(needle, where, logger.group(1) if logger else "", line)

    def scan_registered(self) -> None:
        """Scan every log file registered so far."""
        for path in registered_logs():
            self.scan_file(path)

    def report(self, findings: Iterable[Finding] | None = None) -> str:
        """One line per finding (all of them unless ``findings`` is given)."""
        chosen = self.findings if findings is None else findings
        return "\n".join(f"- {finding}" for finding in chosen)
