"""middleware/securityheaders.py: no response is cacheable or sniffable, errors included."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.securityheaders import SecurityHeadersMiddleware


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok", headers={"Cache-Control": "max-age=3600"})


def test_headers_on_success_and_on_404() -> None:
    client = TestClient(
        Starlette(routes=[Route("/", ok)], middleware=[Middleware(SecurityHeadersMiddleware)])
    )
    for response in (client.get("/"), client.get("/missing")):
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
