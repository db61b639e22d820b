"""loadtests/middleware_cost.py: it drives the app factory's real stack, every layer of it."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from loadtests.middleware_cost import BODY, _stack, _wrap, post_scope, run
from middleware.audit import AuditWriter
from observability.audit import AuditRecord


def test_the_measured_stack_answers_through_every_layer() -> None:
    written: list[AuditRecord] = []

    async def store(record: AuditRecord) -> Exception | None:
        written.append(record)
        return None

    async def answer() -> list[Message]:
        writer = AuditWriter(store, wait=True)
        await writer.start()
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait(BODY)
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        await _wrap(await _stack(writer))(post_scope(), queue.get, send)
        await writer.close()
        return sent

    start = asyncio.run(answer())[0]
    names = {name for name, _ in start["headers"]}
    assert start["status"] == 200
    # Request id, security headers and the rate limiter's: those layers ran.
    assert {b"x-server-request-id", b"cache-control", b"ratelimit-remaining"} <= names
    assert [(r.op, r.status) for r in written] == [("create", 200)]  # and the audit layer


def test_every_layer_and_the_whole_stack_get_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(run(requests=20, batches=2))
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows[0] == "no layer" and rows[-1] == "the whole stack"
    assert {"RequestIdMiddleware", "AuditMiddleware", "BodyLimitMiddleware"} <= set(rows)
