"""Masking of personal data for logs (DESIGN.md rule 7): enough to correlate, not to identify."""

from __future__ import annotations


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
