"""middleware/requestid.py: every response carries an id; a safe caller id is kept."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.context import request_context
from middleware.requestid import RequestIdMiddleware
from observability.logging import REQUEST_ID


async def show(request: Request) -> Response:
    return JSONResponse(
        {"state": request_context(request.scope).request_id, "context": REQUEST_ID.get()}
    )


client = TestClient(
    Starlette(routes=[Route("/", show)], middleware=[Middleware(RequestIdMiddleware)])
)


def test_generated_id_reaches_handler_log_context_and_response() -> None:
    response = client.get("/")
    body = response.json()
    assert body["state"] == body["context"] == response.headers["x-request-id"]
    assert client.get("/").headers["x-request-id"] != response.headers["x-request-id"]


def test_callers_well_formed_id_is_kept() -> None:
    response = client.get("/", headers={"X-Request-ID": "trace-abc_1.2:3"})
    assert response.headers["x-request-id"] == "trace-abc_1.2:3"


def test_malformed_caller_id_is_replaced() -> None:
    for bad in ("has space", "x" * 200, "new\\nline", "<script>"):
        response = client.get("/", headers={"X-Request-ID": bad})
        assert response.headers["x-request-id"] != bad
        assert response.json()["state"] == response.headers["x-request-id"]
