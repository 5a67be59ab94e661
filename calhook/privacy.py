"""Masking of personal data for logs (DESIGN.md rule 7): enough to correlate, not to identify."""

from __future__ import annotations

import re
from collections.abc import Iterable

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*")
_WORD = re.compile(r"\w+")
# A run of digits (with the separators of phone numbers) long enough to be a phone number.
_DIGITS = re.compile(r"\+?\d[\d ()/.-]{5,}\d")
# A customer's or an appointment's uuid identifies a person as well as a name does.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_QUOTED = re.compile(r"(['\"])(?:(?!\1).){1,200}\1")


def mask_email(email: str | None) -> str | None:
    """``luca.brunner@example.org`` → ``l***@e***.org``."""
    if not email:
        return None
    local, _, domain = email.rpartition("@")
    if not local:
        return "***"
    host, dot, tld = domain.rpartition(".")
    masked_domain = f"{host[:1]}***{dot}{tld}" if host else "***"
    return f"{local[:1]}***@{masked_domain}"


def mask_phone(phone: str | None) -> str | None:
    """``+41790000142`` → ``+41*******42``: country code and last two digits."""
    if not phone:
        return None
    if len(phone) <= 5:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 5) + phone[-2:]


def mask_name(name: str | None) -> str | None:
    """``Brunner`` → ``B.``."""
    if not name:
        return None
    return f"{name[:1]}."


def payload_strings(payload: object, shortest: int = 2) -> set[str]:
    """Every string value in a (parsed JSON) payload, and each of its words, at least
    ``shortest`` long: what a library's error may echo of the person (a name, a street, a
    remark), whole or in part."""
    found: set[str] = set()
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            value = item.strip()
            if len(value) >= shortest:
                found.add(value)
            # A number on its own (a day, a house number) tells little; a long one is caught as
            # a phone number.
            found.update(w for w in _WORD.findall(value) if len(w) >= shortest and not w.isdigit())
    return found


def scrub(text: str, known: Iterable[str] = (), limit: int = 300) -> str:
    """An error's text fit to show beside its failure group: the ``known`` values (the event's
    own strings and their words, :func:`payload_strings`) wherever they stand as words, in any
    case; e-mail addresses, uuids, phone-like numbers and quoted values (where libraries echo
    what they were given); at most ``limit`` characters."""
    values = sorted({v for v in known if v}, key=len, reverse=True)
    if values:
        pattern = "|".join(re.escape(v) for v in values)
        text = re.sub(rf"(?<!\w)(?:{pattern})(?!\w)", "***", text, flags=re.IGNORECASE)
    text = _UUID.sub("<uuid>", text)
    text = _EMAIL.sub(lambda m: mask_email(m.group()) or "***", text)
    text = _QUOTED.sub(lambda m: f"{m.group(1)}***{m.group(1)}", text)
    text = _DIGITS.sub(lambda m: m.group() if _DATE.fullmatch(m.group()) else "***", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
