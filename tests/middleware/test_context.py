"""middleware/context.py: what one layer resolves about a request is what the others read.

The audit record is where a user sees it: the client address, the request id, the operation
and the key name all come from the one request context.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.apikeys import APIKeyMiddleware, token_digest
from middleware.audit import AuditMiddleware
from middleware.clientip import ClientIPMiddleware
from middleware.context import request_context
from middleware.requestid import RequestIdMiddleware
from observability.audit import AuditRecord

ALICE = "alice-token-0123456789abcdefghijklmnopqrstuvwxyz"


class ListSink:
    """An audit sink that keeps what it is given (through its own writes only)."""

    waits = False

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def write(self, record: AuditRecord) -> None:
        self.records.append(record)

    def submit(self, record: AuditRecord) -> None:
        self.records.append(record)

    def spill(self, record: AuditRecord) -> None:  # pragma: no cover - the sink never fails
        raise AssertionError("nothing is spilled")


async def fetch(request: Request) -> Response:
    context = request_context(request.scope)
    context.op = "fetch"
    context.secret_id = (await request.json())["secret_id"]
    return JSONResponse({"secret": "c2VjcmV0"})


async def status(request: Request) -> Response:
    return JSONResponse({"ok": True})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    # Lifespan state is copied into every request's scope["state"]; the context must not be.
    yield {"started": True}


def audited(sink: ListSink, *layers: Middleware) -> Starlette:
    """/vault/fetch and /vault/status behind the audit middleware, under ``layers``."""
    return Starlette(
        routes=[
            Route("/vault/fetch", fetch, methods=["POST"]),
            Route("/vault/status", status),
        ],
        middleware=[
            *layers,
            Middleware(
                AuditMiddleware,
                sink=sink,
                operations={"/vault/fetch": "fetch"},
                hash_secret_id=lambda secret_id: "hmac-of-" + secret_id[::-1],
            ),
        ],
        lifespan=lifespan,
    )


def test_an_ipv4_mapped_peer_is_recorded_as_its_ipv4_address() -> None:
    sink = ListSink()
    with TestClient(audited(sink), client=("::ffff:203.0.113.9", 50000)) as client:
        client.get("/vault/status")
    assert [r.client_ip for r in sink.records] == ["203.0.113.9"]


def test_the_address_a_trusted_proxy_forwarded_is_recorded() -> None:
    sink = ListSink()
    resolve = Middleware(ClientIPMiddleware, trusted_proxies=[ip_network("10.0.0.0/8")])
    with TestClient(audited(sink, resolve), client=("::ffff:10.0.0.5", 50000)) as client:
        client.get("/vault/status", headers={"X-Forwarded-For": "198.51.100.4"})
    assert [r.client_ip for r in sink.records] == ["198.51.100.4"]


def test_the_request_id_in_the_response_is_the_one_recorded() -> None:
    sink = ListSink()
    with TestClient(audited(sink, Middleware(RequestIdMiddleware))) as client:
        response = client.get("/vault/status")
    assert [r.request_id for r in sink.records] == [response.headers["x-request-id"]]


def test_the_callers_key_name_is_recorded() -> None:
    sink = ListSink()
    guard = Middleware(APIKeyMiddleware, keys={"alice": token_digest(ALICE)})
    with TestClient(audited(sink, guard)) as client:
        client.get("/vault/status", headers={"Authorization": f"Bearer {ALICE}"})
    assert [r.api_key_name for r in sink.records] == ["alice"]


def test_what_one_request_told_the_layers_does_not_reach_the_next() -> None:
    sink = ListSink()
    with TestClient(audited(sink, Middleware(RequestIdMiddleware))) as client:
        client.post("/vault/fetch", json={"secret_id": "abc-123"})
        client.get("/vault/status")
    assert [(r.op, r.secret_id_hmac) for r in sink.records] == [
        ("fetch", "hmac-of-321-cba"),
        ("other", None),
    ]
