"""loadtests/request_cost.py: it drives the whole app, store included, and tells features
apart by what they cost."""

from __future__ import annotations

import asyncio

import pytest

from loadtests.request_cost import call, run, settings
from vault.app import create_app


def test_requests_go_through_the_whole_app_and_its_store() -> None:
    async def both() -> tuple[int, int, bytes]:
        app = create_app(settings({}, None))
        async with app.router.lifespan_context(app):
            created, body = await call(app, "/vault/secret/create", b'{"secret": "c2VjcmV0"}')
            secret_id = body.split(b'"')[3]
            fetched, secret = await call(
                app, "/vault/secret/fetch", b'{"secret_id": "' + secret_id + b'"}'
            )
            return created, fetched, secret

    created, fetched, secret = asyncio.run(both())
    assert (created, fetched) == (200, 200)
    assert secret == b'{"secret":"c2VjcmV0"}'


@pytest.mark.parametrize("concurrency", [1, 4])
def test_each_figure_is_counted_over_the_requests_it_measured(concurrency: int) -> None:
    cost = asyncio.run(run("fetch", concurrency, 200, 2, {"AUDIT_ENABLED": "false"}))
    # The event loop's thread is part of the process; user and system time make its CPU.
    assert 0 < cost.loop_thread <= cost.cpu
    assert cost.user + cost.system == pytest.approx(cost.cpu, rel=0.5)
    assert cost.wall > 0
    assert cost.row("x").startswith("| x | ")
