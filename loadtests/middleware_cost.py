"""CPU per request of the middleware stack alone, in process, without a server or a store.

The stack the app factory builds from default settings (rate limit so high it never
refuses), around a trivial ASGI app that reads the body and answers a create's 200, driven
directly: receive is ``get`` of an ``asyncio.Queue``, as Hypercorn hands it; audit records
go to a writer whose insert does nothing. Each layer alone over the same app, then the
whole stack; per row, the median of many short batches' process CPU per request (min
beside it), steadier than a server's on a shared machine. What a layer costs inside a real
request differs (its store calls are not here); what this measures is the layers' own work.

    python -m loadtests.middleware_cost                  # every layer, then the stack
    python -m loadtests.middleware_cost --batches 60 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import statistics
import tempfile
import time
from collections.abc import Sequence

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.audit import AuditWriter
from middleware.context import request_context
from observability.audit import AuditRecord
from vault.app import _middleware, _services
from vault.crypto import generate_key
from vault.settings import Settings

PATH = "/vault/secret/create"
BODY: Message = {"type": "http.request", "body": b'{"secret": "c2VjcmV0"}', "more_body": False}


class _Route:
    path = PATH  # what the router would leave in scope["route"]


async def _nothing_stored(record: AuditRecord) -> Exception | None:
    return None


async def _create(scope: Scope, receive: Receive, send: Send) -> None:
    """A create's answer with no work behind it."""
    await receive()
    request_context(scope).op = "create"
    scope["route"] = _Route
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def post_scope(path: str = PATH, length: int = len(BODY["body"])) -> Scope:
    """The scope Hypercorn hands an app for a JSON POST to ``path`` with a body of
    ``length`` bytes, from a local client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"wrk"),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _stack(writer: AuditWriter) -> list[Middleware]:
    settings = Settings.from_env(
        {
            "MASTER_KEY": generate_key(),
            "DATA_DIR": tempfile.mkdtemp(prefix="middleware-cost-"),
            "RATE_LIMIT": "1000000/second",
        }
    )
    services = dataclasses.replace(_services(settings, None), writer=writer)
    return _middleware(services)


def _wrap(layers: Sequence[Middleware]) -> ASGIApp:
    app: ASGIApp = _create
    for layer in reversed(layers):
        app = layer.cls(app, *layer.args, **layer.kwargs)
    return app


async def _measure(app: ASGIApp, requests: int, batches: int) -> tuple[float, float]:
    """Median and least CPU microseconds per request over ``batches`` batches."""
    queue: asyncio.Queue[Message] = asyncio.Queue()

    async def discard(message: Message) -> None:
        return None

    async def one() -> None:
        queue.put_nowait(BODY)
        await app(post_scope(), queue.get, discard)

    for _ in range(min(requests, 500)):
        await one()
    per_request = []
    for _ in range(batches):
        gc.collect()
        started = time.process_time()
        for _ in range(requests):
            await one()
        per_request.append((time.process_time() - started) / requests * 1e6)
    return statistics.median(per_request), min(per_request)


async def run(requests: int, batches: int) -> None:
    writer = AuditWriter(_nothing_stored, wait=True)
    await writer.start()
    layers = await _stack(writer)
    rows: list[tuple[str, list[Middleware]]] = [("no layer", [])]
    rows += [(getattr(layer.cls, "__name__", repr(layer.cls)), [layer]) for layer in layers]
    rows.append(("the whole stack", layers))
    print("| layers | CPU us/request, median | min |")
    print("|---|---:|---:|")
    for name, chosen in rows:
        median, least = await _measure(_wrap(chosen), requests, batches)
        print(f"| {name} | {median:.1f} | {least:.1f} |", flush=True)
    await writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch (2000)")
    parser.add_argument("--batches", type=int, default=25, help="batches per row (25)")
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.batches))


if __name__ == "__main__":
    main()
