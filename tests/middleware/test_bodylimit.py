"""middleware/bodylimit.py on a tiny app that echoes how many bytes it read."""

from __future__ import annotations

import asyncio
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


# Driven at the ASGI level: the refusal's handling of the unread rest of a body differs by
# HTTP version, which the test client cannot show.


class EndlessUpload:
    """A receive() handing out 1 KiB chunks until told the stream closed, counting them."""

    def __init__(self) -> None:
        self.read = 0
        self.closed = asyncio.Event()

    async def __call__(self) -> dict[str, object]:
        if self.closed.is_set():
            return {"type": "http.disconnect"}
        self.read += 1024
        await asyncio.sleep(0)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}


async def refuse(http_version: str, upload: EndlessUpload) -> list[dict[str, object]]:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("the app must not run for a body over the cap")

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            upload.closed.set()  # the server ends the stream once the answer is complete

    scope = {
        "type": "http",
        "http_version": http_version,
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", b"1000000")],
    }
    limit = BodyLimitMiddleware(app, max_body_bytes=4096, body_timeout=5)
    await asyncio.wait_for(limit(scope, upload, send), 10)  # type: ignore[arg-type]
    return sent


def test_http1_refusal_closes_the_connection_and_reads_only_what_is_queued() -> None:
    upload = EndlessUpload()
    sent = asyncio.run(refuse("1.1", upload))
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]  # type: ignore[operator]
    # Read only while the answer was going out, never the whole announced megabyte.
    assert upload.read < 100_000


def test_http2_refusal_reads_a_bounded_rest_first_and_sends_no_connection_header() -> None:
    upload = EndlessUpload()
    sent = asyncio.run(refuse("2", upload))
    assert sent[0]["status"] == 413
    assert all(name != b"connection" for name, _ in sent[0]["headers"])  # type: ignore[attr-defined]
    # The rest is read before the answer, up to four caps' worth, and not more.
    assert 4 * 4096 <= upload.read <= 4 * 4096 + 1024
