"""middleware/requestid.py: every request gets an id of the server's own; a safe caller id
is kept beside it and echoed."""

from __future__ import annotations

import re

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.context import request_context
from middleware.requestid import RequestIdMiddleware
from observability.logging import CLIENT_REQUEST_ID, REQUEST_ID


async def show(request: Request) -> Response:
    context = request_context(request.scope)
    return JSONResponse(
        {
            "state": context.request_id,
            "context": REQUEST_ID.get(),
            "client_state": context.client_request_id,
            "client_context": CLIENT_REQUEST_ID.get(),
        }
    )


client = TestClient(
    Starlette(routes=[Route("/", show)], middleware=[Middleware(RequestIdMiddleware)])
)


def test_generated_id_reaches_handler_log_context_and_response() -> None:
    response = client.get("/")
    body = response.json()
    assert body["state"] == body["context"] == response.headers["x-request-id"]
    assert response.headers["x-server-request-id"] == body["state"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["state"])
    assert body["client_state"] is body["client_context"] is None
    assert client.get("/").headers["x-request-id"] != response.headers["x-request-id"]


def test_callers_well_formed_id_is_kept() -> None:
    response = client.get("/", headers={"X-Request-ID": "trace-abc_1.2:3"})
    assert response.headers["x-request-id"] == "trace-abc_1.2:3"
    body = response.json()
    assert body["client_state"] == body["client_context"] == "trace-abc_1.2:3"


def test_the_requests_id_is_the_servers_never_the_callers() -> None:
    """Two requests sending one X-Request-ID: each gets an id of its own, the one the log
    context holds and X-Server-Request-ID names; both have the caller's echoed."""
    answers = [client.get("/", headers={"X-Request-ID": "same"}) for _ in range(2)]
    ids = [answer.json()["state"] for answer in answers]
    assert ids[0] != ids[1]
    for answer, request_id in zip(answers, ids, strict=True):
        assert answer.json()["context"] == request_id != "same"
        assert answer.headers["x-server-request-id"] == request_id
        assert answer.headers["x-request-id"] == "same"


def test_malformed_caller_id_is_replaced() -> None:
    for bad in ("has space", "x" * 200, "new\\nline", "<script>"):
        response = client.get("/", headers={"X-Request-ID": bad})
        assert response.headers["x-request-id"] != bad
        assert response.json()["state"] == response.headers["x-request-id"]
        assert response.json()["client_state"] is None  # not kept, not logged


def test_the_two_headers_must_differ() -> None:
    with pytest.raises(ValueError, match="two different headers"):
        RequestIdMiddleware(show, header="X-Request-ID", server_header="x-request-id")
