"""middleware/errors.py: an exception becomes a generic 500 and one safe log line."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.errors import GENERIC_DETAIL, InternalErrorMiddleware
from middleware.requestid import RequestIdMiddleware


async def boom(request: Request) -> Response:
    raise RuntimeError("duplicate key: {_id: 'sensitive-value'}")


def test_exception_becomes_generic_500_logged_by_type_and_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Starlette(
        routes=[Route("/", boom)],
        middleware=[Middleware(RequestIdMiddleware), Middleware(InternalErrorMiddleware)],
    )
    caplog.set_level(logging.ERROR)
    response = TestClient(app).get("/", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 500
    assert response.json() == {"detail": GENERIC_DETAIL}
    assert "sensitive-value" not in response.text
    assert len(caplog.records) == 1
    record = caplog.records[0]
    # Logged with the server's own id, as the answer names it, and the caller's beside it.
    assert record.request_id == response.headers["x-server-request-id"]  # type: ignore[attr-defined]
    assert record.client_request_id == "req-42"  # type: ignore[attr-defined]
    message = record.getMessage()
    assert "RuntimeError" in message
    assert "test_errors.py" in message
    assert "sensitive-value" not in message
    assert record.exc_info is None
