"""Work out which client sent a request: the peer, or whom a trusted proxy says it forwarded.

X-Forwarded-For is only believed when the TCP peer is one of ``trusted_proxies``; then its
entries are read right to left (the order proxies appended them), skipping our own proxies,
and the first address not in a trusted network is the client. Entries left of that were
written by the client itself and are ignored, so a caller cannot choose its own address.
The result is put in the request context for the rate limiter and the audit log, which read
it through ``client_ip(scope)``: the one place the client address comes from.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.context import request_context

_XFF = b"x-forwarded-for"

_Address = IPv4Address | IPv6Address


@functools.lru_cache(maxsize=4096)  # the same few peers and proxies, request after request
def _parse(text: str) -> _Address | None:
    """The address in ``text``, IPv4-mapped IPv6 as IPv4; None if it is not an address."""
    try:
        address = ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _normalised(host: str) -> str:
    """``host`` as ``_peer`` gives it: an address's own text, else ``host`` unchanged.
    Cached beside ``_parse``: an address's ``str()`` costs a microsecond every time."""
    address = _parse(host)
    return host if address is None else str(address)


def _peer(scope: Scope) -> str:
    """The TCP peer's address, normalised when it is one; "unknown" when the server has none."""
    client = scope.get("client")
    if not client:
        return "unknown"
    return _normalised(str(client[0]))


def client_ip(scope: Scope) -> str:
    """The client address ClientIPMiddleware resolved, or the normalised peer if it did not
    run (IPv4-mapped IPv6 as IPv4, "unknown" without a peer)."""
    resolved = request_context(scope).client_ip
    return resolved if resolved is not None else _peer(scope)


class ClientIPMiddleware:
    def __init__(
        self, app: ASGIApp, *, trusted_proxies: Sequence[IPv4Network | IPv6Network] = ()
    ) -> None:
        self.app = app
        self.trusted_proxies = tuple(trusted_proxies)

    def _trusted(self, address: _Address | None) -> bool:
        # A v4 address is never "in" a v6 network and vice versa: no TypeError, just False.
        return address is not None and any(address in net for net in self.trusted_proxies)

    def _resolve(self, scope: Scope) -> str:
        peer = _peer(scope)
        if not self._trusted(_parse(peer)):
            return peer
        entries = [
            entry.strip()
            for name, value in scope["headers"]
            if name.lower() == _XFF
            for entry in value.decode("latin-1").split(",")
        ]
        last_trusted = peer
        # Blank entries (an empty header, "a,,b") say nothing about any hop and are skipped.
        for entry in reversed([e for e in entries if e]):
            address = _parse(entry)
            if address is None:
                # Past a garbled entry nothing can be trusted: the hop that wrote it is the
                # furthest we can vouch for.
                return last_trusted
            if not self._trusted(address):
                return str(address)
            last_trusted = str(address)
        # Every hop is one of ours (a request from inside): the leftmost is the origin.
        return last_trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_context(scope).client_ip = self._resolve(scope)
        await self.app(scope, receive, send)
