"""Who is posting: the client address behind trusted proxies, and the allow-list it must be on.

``X-Forwarded-For`` is believed only from a trusted proxy, and only as far as trusted proxies
wrote it: the list is walked from the right (the hop nearest to us), skipping addresses of
trusted proxies, and the first address that is not one is the client. Anything left of it was
written by the client itself and proves nothing. Networks are parsed once, at start-up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from ingest.errors import Forbidden

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> Address:
    address = ipaddress.ip_address(text.strip())
    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d; the allow-list says a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


def client_address(
    peer: str, forwarded: Sequence[str], trusted: Sequence[Network]
) -> Address | None:
    """The client's address: ``peer``, or the first untrusted hop of ``forwarded`` (the
    ``X-Forwarded-For`` values in order) when ``peer`` is a trusted proxy. None when an address
    that must be read is not one."""
    try:
        address = _address(peer)
    except ValueError:
        return None
    if not forwarded or not _within(address, trusted):
        return address
    for hop in reversed(",".join(forwarded).split(",")):
        try:
            address = _address(hop)
        except ValueError:
            return None
        if not _within(address, trusted):
            return address
    # Every hop is a trusted proxy: the leftmost is as far as anyone vouches for.
    return address


class ClientFilter:
    """``CALHOOK_ALLOWED_IPS`` and ``CALHOOK_TRUSTED_PROXIES``, ready for each request."""

    def __init__(self, allowed: Sequence[Network], trusted: Sequence[Network]) -> None:
        self.allowed = tuple(allowed)
        self.trusted = tuple(trusted)

    @property
    def active(self) -> bool:
        """False when everyone may post (no allow-list): nothing to check."""
        return bool(self.allowed)

    def check(self, peer: str | None, forwarded: Sequence[str]) -> None:
        """Raise Forbidden unless the client is on the allow-list."""
        client = client_address(peer, forwarded, self.trusted) if peer else None
        if client is None:
            raise Forbidden("the client address cannot be determined")
        if not _within(client, self.allowed):
            raise Forbidden("the client address is not allowed to post webhooks")
