"""middleware/clientip.py on a tiny app that echoes the client address it was given."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_network

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Scope

from middleware.clientip import ClientIPMiddleware, client_ip
from middleware.context import request_context

Resolve = Callable[..., str]
TRUSTED = ("10.0.0.0/8", "fd00::/8")


async def echo(request: Request) -> Response:
    return PlainTextResponse(client_ip(request.scope))


def echo_app(trusted: tuple[str, ...]) -> Starlette:
    networks = [ip_network(n) for n in trusted]
    return Starlette(
        routes=[Route("/", echo)],
        middleware=[Middleware(ClientIPMiddleware, trusted_proxies=networks)],
    )


@pytest.fixture
def resolve() -> Resolve:
    """``resolve(peer, *xff_headers, trusted=TRUSTED)``: the address the app is told."""

    def run(peer: str, *xff: str, trusted: tuple[str, ...] = TRUSTED) -> str:
        client = TestClient(echo_app(trusted), client=(peer, 1234))
        response = client.get("/", headers=[("X-Forwarded-For", value) for value in xff])
        assert response.status_code == 200
        return response.text

    return run


def test_untrusted_peer_is_the_client_whatever_it_forwards(resolve: Resolve) -> None:
    assert resolve("198.51.100.4") == "198.51.100.4"
    assert resolve("198.51.100.4", "203.0.113.7") == "198.51.100.4"
    assert resolve("198.51.100.4", "10.0.0.9") == "198.51.100.4"


def test_without_trusted_proxies_forwarded_for_is_ignored(resolve: Resolve) -> None:
    assert resolve("10.0.0.5", "203.0.113.7", trusted=()) == "10.0.0.5"


def test_trusted_proxy_forwarding_a_client(resolve: Resolve) -> None:
    assert resolve("10.0.0.5", "203.0.113.7") == "203.0.113.7"


def test_trusted_proxy_without_forwarded_for_is_the_client(resolve: Resolve) -> None:
    assert resolve("10.0.0.5") == "10.0.0.5"


def test_chain_of_trusted_proxies_is_walked_back_to_the_client(resolve: Resolve) -> None:
    assert resolve("10.0.0.5", "203.0.113.7, 10.1.2.3, 10.0.0.8") == "203.0.113.7"
    # The same chain split over several headers, as some proxies send it.
    assert resolve("10.0.0.5", "203.0.113.7", "10.1.2.3, 10.0.0.8") == "203.0.113.7"


def test_addresses_the_client_wrote_itself_are_ignored(resolve: Resolve) -> None:
    # The caller sent "X-Forwarded-For: 1.1.1.1" (or a trusted-looking address) and our
    # proxy appended the address it really saw.
    assert resolve("10.0.0.5", "1.1.1.1, 203.0.113.7") == "203.0.113.7"
    assert resolve("10.0.0.5", "10.9.9.9, 203.0.113.7, 10.0.0.8") == "203.0.113.7"
    assert resolve("10.0.0.5", "1.1.1.1", "203.0.113.7") == "203.0.113.7"


def test_malformed_entry_stops_the_walk_at_the_last_trusted_hop(resolve: Resolve) -> None:
    assert resolve("10.0.0.5", "203.0.113.7, not-an-ip, 10.0.0.8") == "10.0.0.8"
    assert resolve("10.0.0.5", "203.0.113.7, 999.1.1.1") == "10.0.0.5"
    assert resolve("10.0.0.5", "203.0.113.7:443") == "10.0.0.5"
    # Blank entries carry nothing and are passed over.
    assert resolve("10.0.0.5", "203.0.113.7, , 10.0.0.8") == "203.0.113.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client(resolve: Resolve) -> None:
    assert resolve("10.0.0.5", "10.3.3.3, 10.0.0.8") == "10.3.3.3"


def test_ipv6_peers_and_clients(resolve: Resolve) -> None:
    assert resolve("fd00::1", "2001:db8::7") == "2001:db8::7"
    assert resolve("2001:db8::99", "2001:db8::7") == "2001:db8::99"
    # Written out in full, the address is still reported in its one canonical form.
    assert resolve("fd00::1", "2001:0DB8:0000:0000:0000:0000:0000:0007") == "2001:db8::7"
    assert resolve("10.0.0.5", "2001:db8::7, fd00::2") == "2001:db8::7"


def test_ipv4_mapped_addresses_count_as_ipv4(resolve: Resolve) -> None:
    # A dual-stack socket reports an IPv4 proxy as ::ffff:10.0.0.5; it is still trusted.
    assert resolve("::ffff:10.0.0.5", "::ffff:203.0.113.7") == "203.0.113.7"
    assert resolve("::ffff:198.51.100.4") == "198.51.100.4"


@pytest.mark.anyio
async def test_a_request_without_a_peer_is_unknown() -> None:
    # A server on a Unix socket may give no client address at all.
    seen: list[str] = []

    async def app(scope: Scope, receive: object, send: object) -> None:
        seen.append(client_ip(scope))

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        pass

    scope: Scope = {
        "type": "http",
        "path": "/",
        "headers": [(b"x-forwarded-for", b"203.0.113.7")],
        "client": None,
    }
    trusted = [ip_network("0.0.0.0/0")]
    await ClientIPMiddleware(app, trusted_proxies=trusted)(scope, receive, send)
    assert seen == ["unknown"]


def test_client_ip_falls_back_to_the_peer_without_the_middleware() -> None:
    assert client_ip({"type": "http", "client": ("::ffff:198.51.100.4", 1)}) == "198.51.100.4"
    assert client_ip({"type": "http", "client": ("10.0.0.5", 1), "state": {}}) == "10.0.0.5"
    resolved: Scope = {"type": "http", "client": ("10.0.0.5", 1)}
    request_context(resolved).client_ip = "203.0.113.7"
    assert client_ip(resolved) == "203.0.113.7"
