"""middleware/bodylimit.py on a tiny app that echoes how many bytes it read."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.bodylimit import BodyLimitMiddleware


@pytest.fixture
def limited() -> TestClient:
    reached: list[int] = []

    async def echo(request: Request) -> Response:
        body = await request.body()
        reached.append(len(body))
        return JSONResponse({"read": len(body)})

    app = Starlette(
        routes=[Route("/", echo, methods=["POST"])],
        middleware=[Middleware(BodyLimitMiddleware, max_body_bytes=100, detail="too big")],
    )
    client = TestClient(app)
    client.reached = reached  # type: ignore[attr-defined]
    return client


def test_body_at_the_cap_passes(limited: TestClient) -> None:
    assert limited.post("/", content=b"x" * 100).json() == {"read": 100}


def test_declared_length_over_the_cap_is_refused_before_reading(limited: TestClient) -> None:
    response = limited.post("/", content=b"x" * 101)
    assert response.status_code == 413
    assert response.json() == {"detail": "too big"}
    assert limited.reached == []  # type: ignore[attr-defined]


def test_streamed_body_is_refused_once_it_passes_the_cap(limited: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(1000):
            yield b"x" * 30

    response = limited.post("/", content=chunks())
    assert response.status_code == 413
    assert limited.reached == []  # type: ignore[attr-defined]


def test_refuses_a_nonsensical_cap() -> None:
    with pytest.raises(ValueError):
        BodyLimitMiddleware(JSONResponse({}), max_body_bytes=0)
