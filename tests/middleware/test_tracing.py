"""middleware/tracing.py: a server span per request, in the caller's trace, with nothing secret."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.requestid import RequestIdMiddleware
from middleware.tracing import TracingMiddleware

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


async def fetch(request: Request) -> Response:
    body = await request.json()
    response = JSONResponse(body)
    response.set_cookie("session", str(body.get("secret_id")))
    return response


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def boom(request: Request) -> Response:
    body = await request.json()
    raise RuntimeError(f"duplicate key: {{_id: {body['secret_id']!r}}}")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def make_client(exporter: InMemorySpanExporter) -> Iterator[Callable[[], TestClient]]:
    """A tiny app behind TracingMiddleware, on a provider of this test's own."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clients: list[TestClient] = []

    def make() -> TestClient:
        app = Starlette(
            routes=[
                Route("/vault/secret/fetch", fetch, methods=["POST"]),
                Route("/vault/boom", boom, methods=["POST"]),
                Route("/healthz", ok),
                Route("/readyz", ok),
                Route("/metrics", ok),
            ],
            middleware=[Middleware(TracingMiddleware, tracer_provider=provider)],
        )
        client = TestClient(app, raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    provider.shutdown()


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def test_callers_traceparent_makes_the_server_span_join_its_trace(
    make_client: Callable[[], TestClient], exporter: InMemorySpanExporter
) -> None:
    traceparent = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
    response = make_client().post(
        "/vault/secret/fetch", json={"secret_id": "x"}, headers={"traceparent": traceparent}
    )
    assert response.status_code == 200
    (span,) = server_spans(exporter)
    assert span.name == "POST /vault/secret/fetch"
    assert span.attributes is not None
    assert span.attributes["http.route"] == "/vault/secret/fetch"
    assert span.attributes["http.status_code"] == 200
    assert format(span.context.trace_id, "032x") == CALLER_TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == CALLER_SPAN_ID


def test_without_traceparent_each_request_starts_a_new_trace(
    make_client: Callable[[], TestClient], exporter: InMemorySpanExporter
) -> None:
    client = make_client()
    for _ in range(2):
        client.post("/vault/secret/fetch", json={"secret_id": "x"})
    spans = server_spans(exporter)
    assert len(spans) == 2
    assert all(span.parent is None for span in spans)
    trace_ids = {span.context.trace_id for span in spans}
    assert len(trace_ids) == 2
    assert int(CALLER_TRACE_ID, 16) not in trace_ids


def test_probes_and_metrics_are_not_traced(
    make_client: Callable[[], TestClient], exporter: InMemorySpanExporter
) -> None:
    client = make_client()
    for path in ("/healthz", "/readyz", "/metrics"):
        response = client.get(
            path, headers={"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"}
        )
        assert response.status_code == 200
    assert exporter.get_finished_spans() == ()
    client.post("/vault/secret/fetch", json={"secret_id": "x"})
    assert len(server_spans(exporter)) == 1  # the exporter does see traced requests


def test_no_body_id_query_or_credential_reaches_a_span_even_with_header_capture_on(
    make_client: Callable[[], TestClient],
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An operator asking for every header must still not get credentials into traces.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", ".*")
    secret_id = "sid-" + uuid.uuid4().hex
    secret = base64.b64encode(b"correct horse battery staple " + uuid.uuid4().bytes).decode()
    token = "tok-" + uuid.uuid4().hex
    cookie = "cookie-" + uuid.uuid4().hex
    client = make_client()
    response = client.post(
        f"/vault/secret/fetch?secret_id={secret_id}",
        json={"secret_id": secret_id, "secret": secret},
        headers={"Authorization": f"Bearer {token}", "Cookie": f"session={cookie}"},
    )
    assert response.json() == {"secret_id": secret_id, "secret": secret}  # the body went through
    (span,) = server_spans(exporter)
    assert span.attributes is not None
    # Header capture is really on, so the absence checks below can fail.
    assert span.attributes["http.request.header.authorization"] == ("[REDACTED]",)
    assert span.attributes["http.response.header.set_cookie"] == ("[REDACTED]",)
    assert span.attributes["http.target"] == "/vault/secret/fetch"
    dumped = "\n".join(s.to_json() for s in exporter.get_finished_spans())
    for value in (secret_id, secret, token, cookie):
        assert value not in dumped


def test_an_escaping_exception_is_recorded_by_type_only(
    make_client: Callable[[], TestClient], exporter: InMemorySpanExporter
) -> None:
    secret_id = "sid-" + uuid.uuid4().hex
    response = make_client().post("/vault/boom", json={"secret_id": secret_id})
    assert response.status_code == 500
    (span,) = server_spans(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RuntimeError"
    assert span.attributes is not None and span.attributes["error.type"] == "RuntimeError"
    assert span.events == ()
    assert secret_id not in span.to_json()


def test_unknown_paths_are_named_by_method_only(
    make_client: Callable[[], TestClient], exporter: InMemorySpanExporter
) -> None:
    assert make_client().get("/no/such/" + uuid.uuid4().hex).status_code == 404
    (span,) = server_spans(exporter)
    assert span.name == "GET"
    assert span.attributes is not None and "http.route" not in span.attributes


def test_the_span_carries_the_servers_request_id(exporter: InMemorySpanExporter) -> None:
    """Behind the request id layer (as in the app), the span names the request by the id its
    log lines and audit record carry: the server's, never the caller's X-Request-ID."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Starlette(
        routes=[Route("/vault/secret/fetch", fetch, methods=["POST"])],
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(TracingMiddleware, tracer_provider=provider),
        ],
    )
    with TestClient(app) as client:
        response = client.post(
            "/vault/secret/fetch", json={"secret_id": "x"}, headers={"X-Request-ID": "mine"}
        )
    provider.shutdown()
    (span,) = server_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["vault.request_id"] == response.headers["x-server-request-id"]
    assert "mine" not in span.to_json()


def test_span_attributes_are_the_documented_set(
    make_client: Callable[[], TestClient], exporter: InMemorySpanExporter
) -> None:
    make_client().post("/vault/secret/fetch", json={"secret_id": "x"})
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert json.loads(span.to_json())["attributes"].keys() == {
        "http.scheme",
        "http.host",
        "net.host.port",
        "http.flavor",
        "http.target",
        "http.url",
        "http.method",
        "http.server_name",
        "http.user_agent",
        "net.peer.ip",
        "net.peer.port",
        "http.route",
        "http.status_code",
    }
