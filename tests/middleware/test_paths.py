"""middleware/paths.py: every layer exempts the same paths by one rule, and labels alike.

The app is the vault's stack in small: tracing, metrics, the rate limiter (one request an
hour per client) and API keys with a metrics token, over the probes, /metrics and one route.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.apikeys import APIKeyMiddleware, token_digest
from middleware.metrics import PrometheusMiddleware
from middleware.paths import UNMATCHED
from middleware.ratelimit import MemoryCounter, RateLimitMiddleware
from middleware.tracing import TracingMiddleware

METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmnopqrstuv"
ALICE = "alice-token-0123456789abcdefghijklmnopqrstuvwxyz"
SLASH_SCANS = ("/healthz/", "/readyz/", "/metrics/")


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def requests_counted(method: str, route: str, status: str) -> Callable[[], float]:
    """Watch http_requests_total for one series; call the result for how much it grew."""

    def read() -> float:
        labels = {"method": method, "route": route, "status": status}
        return REGISTRY.get_sample_value("http_requests_total", labels) or 0.0

    before = read()
    return lambda: read() - before


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def client(exporter: InMemorySpanExporter) -> Iterator[TestClient]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Starlette(
        routes=[
            Route("/healthz", ok),
            Route("/readyz", ok),
            Route("/metrics", ok),
            Route("/vault/items/{item_id}", ok),
        ],
        middleware=[
            Middleware(TracingMiddleware, tracer_provider=provider),
            Middleware(PrometheusMiddleware),
            Middleware(RateLimitMiddleware, limits=((1, 3600),), counter=MemoryCounter()),
            Middleware(
                APIKeyMiddleware,
                keys={"alice": token_digest(ALICE)},
                metrics_token_digest=token_digest(METRICS_TOKEN),
            ),
        ],
    )
    app.router.redirect_slashes = False  # as in the vault
    with TestClient(app) as client:
        yield client
    provider.shutdown()


def span_names(exporter: InMemorySpanExporter) -> list[str]:
    return [s.name for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


@pytest.mark.parametrize("path", SLASH_SCANS)
def test_a_slash_scan_is_traced_as_an_unknown_path(
    client: TestClient, exporter: InMemorySpanExporter, path: str
) -> None:
    client.get(path)
    assert span_names(exporter) == ["GET"]


@pytest.mark.parametrize("path", SLASH_SCANS)
def test_a_slash_scan_is_counted_under_the_unmatched_label(client: TestClient, path: str) -> None:
    unmatched = requests_counted("GET", UNMATCHED, "404")
    client.get(path)
    assert unmatched() == 1


@pytest.mark.parametrize("path", SLASH_SCANS)
def test_a_slash_scan_is_rate_limited(client: TestClient, path: str) -> None:
    client.get(path)
    assert client.get(path).status_code == 429


@pytest.mark.parametrize("path", SLASH_SCANS)
def test_a_slash_scan_needs_no_key_and_finds_nothing(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


EXEMPT_CALLS = (("/metrics", METRICS_TOKEN), ("/healthz", None), ("/readyz", None)) * 3


def call(client: TestClient, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get(path, headers=headers).status_code


def test_the_exempt_paths_themselves_are_never_rate_limited(client: TestClient) -> None:
    assert [call(client, path, token) for path, token in EXEMPT_CALLS] == [200] * 9


def test_the_exempt_paths_themselves_are_not_traced(
    client: TestClient, exporter: InMemorySpanExporter
) -> None:
    for path, token in EXEMPT_CALLS:
        call(client, path, token)
    assert span_names(exporter) == []


def test_probes_are_counted_in_the_metrics(client: TestClient) -> None:
    # Only /metrics is left out of them: a probe that starts failing must show there.
    probes = requests_counted("GET", "/healthz", "200")
    client.get("/healthz")
    assert probes() == 1


def test_probes_are_exempt_under_a_root_path() -> None:
    # A server mounted under /api hands the app /api/healthz; the router answers /healthz.
    app = Starlette(
        routes=[Route("/healthz", ok)],
        middleware=[Middleware(RateLimitMiddleware, limits=((1, 3600),), counter=MemoryCounter())],
    )
    with TestClient(app, root_path="/api") as client:
        answers = [client.get("/api/healthz").status_code for _ in range(3)]
    assert answers == [200, 200, 200]


def test_an_unknown_path_has_no_template_and_metrics_label_it_unmatched(
    client: TestClient,
) -> None:
    unmatched = requests_counted("GET", UNMATCHED, "401")
    # Refused by the API key layer before routing; the raw path must not become a label.
    assert client.get("/vault/nope/7f3a9c2e").status_code == 401
    assert unmatched() == 1


def test_tracing_and_metrics_name_a_refused_request_by_the_same_template(
    client: TestClient, exporter: InMemorySpanExporter
) -> None:
    counted = requests_counted("GET", "/vault/items/{item_id}", "401")
    client.get("/vault/items/7f3a9c2e")  # refused before the router ran: no key
    assert (span_names(exporter), counted()) == (["GET /vault/items/{item_id}"], 1)
