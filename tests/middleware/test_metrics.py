"""middleware/metrics.py: requests are counted and timed by route template, never raw path.

prometheus_client's metrics are process-wide, so every assertion is on a change in value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from middleware.context import request_context
from middleware.metrics import PrometheusMiddleware
from observability.metrics import metrics_app


def value(name: str, **labels: str) -> float:
    """A sample's current value; a series not yet created counts as 0."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def total(name: str) -> float:
    """The sum of every series of one sample name, whatever its labels."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name
    )


def delta(read: Callable[[], float]) -> Callable[[], float]:
    """Start watching a value; call the result to get how much it has changed since."""
    before = read()
    return lambda: read() - before


def counted(method: str, route: str, status: str) -> Callable[[], float]:
    """Watch http_requests_total for one method, route and status."""
    return delta(lambda: value("http_requests_total", method=method, route=route, status=status))


def timed(method: str, route: str) -> Callable[[], float]:
    """Watch how many durations were observed for one method and route."""
    return delta(lambda: value("http_request_duration_seconds_count", method=method, route=route))


async def item(request: Request) -> Response:
    return JSONResponse({"item": request.path_params["item_id"]})


async def slow(request: Request) -> Response:
    await anyio.sleep(0.05)
    return PlainTextResponse("done")


async def in_flight(request: Request) -> Response:
    return JSONResponse({"in_progress": value("http_requests_in_progress", method="GET")})


async def boom(request: Request) -> Response:
    raise RuntimeError("endpoint failed")


async def create(request: Request) -> Response:
    request_context(request.scope).op = "create"
    if (await request.json()).get("secret") is None:
        raise HTTPException(400, "field 'secret' is missing")
    return JSONResponse({"secret_id": "0b6c3f5e-5a1d-4c8e-9d1e-2f4a6b8c0d1e"})


async def fetch(request: Request) -> Response:
    request_context(request.scope).op = "fetch"
    if (await request.json()).get("secret_id") != "known":
        raise HTTPException(404, "no secret has this secret_id")
    return JSONResponse({"secret": "aGk="})


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def metrics_test_app() -> Starlette:
    """A tiny app with just the metrics middleware and /metrics, slash redirects off as in vault."""
    app = Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/slow", slow),
            Route("/in-flight", in_flight),
            Route("/boom", boom),
            Route("/create", create, methods=["POST"]),
            Route("/fetch", fetch, methods=["POST"]),
            WebSocketRoute("/ws", echo),
            Route("/metrics", metrics_app(multiprocess_dir=None)),
        ],
        middleware=[Middleware(PrometheusMiddleware)],
    )
    app.router.redirect_slashes = False
    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(metrics_test_app()) as client:
        yield client


def test_requests_counted_by_method_route_template_and_status(client: TestClient) -> None:
    ok = counted("GET", "/items/{item_id}", "200")
    refused = counted("POST", "/items/{item_id}", "405")
    durations = timed("GET", "/items/{item_id}")

    assert client.get("/items/1").status_code == 200
    assert client.get("/items/2").status_code == 200
    assert client.post("/items/3").status_code == 405

    assert ok() == 2
    assert refused() == 1
    assert durations() == 2


def test_duration_is_measured_around_the_whole_request(client: TestClient) -> None:
    labels = {"method": "GET", "route": "/slow"}
    count = delta(lambda: value("http_request_duration_seconds_count", **labels))
    seconds = delta(lambda: value("http_request_duration_seconds_sum", **labels))
    fast = delta(lambda: value("http_request_duration_seconds_bucket", le="0.025", **labels))

    assert client.get("/slow").text == "done"

    assert count() == 1
    assert 0.05 <= seconds() < 10
    assert fast() == 0  # a 50 ms request is not in the 25 ms bucket


def test_path_parameter_values_never_appear_in_metrics(client: TestClient) -> None:
    client.get("/items/7f3a9c2e-secret-id-4d1b")
    client.get("/nowhere/7f3a9c2e-secret-id-4d1b")

    exposition = client.get("/metrics").text

    assert "7f3a9c2e" not in exposition
    assert 'route="/items/{item_id}"' in exposition
    assert "/nowhere" not in exposition


def test_unmatched_paths_share_one_label(client: TestClient) -> None:
    unmatched = counted("GET", "unmatched", "404")

    for path in ("/nope", "/nope/abc", "/items", "/items/1/extra"):
        assert client.get(path).status_code == 404

    assert unmatched() == 4


def test_unknown_methods_share_one_label(client: TestClient) -> None:
    other = counted("other", "/items/{item_id}", "405")

    assert client.request("BREW", "/items/1").status_code == 405
    assert client.request("XYZZY", "/items/1").status_code == 405

    assert other() == 2
    assert 'method="BREW"' not in client.get("/metrics").text


def test_endpoint_exception_counts_as_500_and_propagates(client: TestClient) -> None:
    failed = counted("GET", "/boom", "500")
    durations = timed("GET", "/boom")

    with pytest.raises(RuntimeError, match="endpoint failed"):
        client.get("/boom")

    assert failed() == 1
    assert durations() == 1


def test_exception_answered_500_to_the_caller_is_counted_once() -> None:
    failed = counted("GET", "/boom", "500")
    with TestClient(metrics_test_app(), raise_server_exceptions=False) as client:
        assert client.get("/boom").status_code == 500
    assert failed() == 1


def test_metrics_endpoint_is_not_measured(client: TestClient) -> None:
    requests = delta(lambda: total("http_requests_total"))
    timed = delta(lambda: total("http_request_duration_seconds_count"))

    for _ in range(3):
        response = client.get("/metrics")
        assert response.status_code == 200
        assert "http_requests_total" in response.text

    assert requests() == 0
    assert timed() == 0


def test_successful_create_counts_a_created_secret(client: TestClient) -> None:
    created = delta(lambda: value("vault_secrets_created_total"))

    assert client.post("/create", json={"secret": "aGk="}).status_code == 200
    assert created() == 1

    assert client.post("/create", json={}).status_code == 400
    assert created() == 1  # a refused create stores nothing


def test_fetches_counted_by_outcome(client: TestClient) -> None:
    not_found = delta(lambda: value("vault_secrets_fetched_total", outcome="not_found"))
    success = delta(lambda: value("vault_secrets_fetched_total", outcome="success"))
    created = delta(lambda: value("vault_secrets_created_total"))

    assert client.post("/fetch", json={"secret_id": "unknown"}).status_code == 404
    assert client.post("/fetch", json={"secret_id": "known"}).status_code == 200

    assert not_found() == 1
    assert success() == 1
    assert created() == 0


def test_requests_without_a_vault_operation_touch_no_vault_counter(client: TestClient) -> None:
    created = delta(lambda: value("vault_secrets_created_total"))
    fetched = delta(lambda: total("vault_secrets_fetched_total"))

    client.get("/items/1")
    client.get("/nope")

    assert created() == 0
    assert fetched() == 0


def test_in_progress_gauge_rises_during_a_request_and_returns_after(client: TestClient) -> None:
    before = value("http_requests_in_progress", method="GET")

    during = client.get("/in-flight").json()["in_progress"]
    with pytest.raises(RuntimeError):
        client.get("/boom")
    client.get("/nope")

    assert during == before + 1
    assert value("http_requests_in_progress", method="GET") == before


def test_websockets_pass_through_unmeasured(client: TestClient) -> None:
    requests = delta(lambda: total("http_requests_total"))

    with client.websocket_connect("/ws") as websocket:
        websocket.send_text("ping")
        assert websocket.receive_text() == "ping"

    assert requests() == 0


def test_metrics_endpoint_answers_only_reads(client: TestClient) -> None:
    response = client.post("/metrics")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.json() == {"detail": "use GET to read metrics"}  # JSON, as every error
    assert client.head("/metrics").status_code == 200
