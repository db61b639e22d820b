"""A store's own threads: calls run off the event loop, results and errors come back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vault.stores.threads import StoreThreads

pytestmark = pytest.mark.anyio


async def test_a_call_runs_in_a_store_thread_and_its_result_or_error_comes_back() -> None:
    threads = StoreThreads(2, "test")
    try:
        assert await threads.submit(lambda: threading.current_thread().name) in {
            "test_0",
            "test_1",
        }

        def fails() -> None:
            raise ValueError("refused")

        with pytest.raises(ValueError, match="refused"):
            await threads.submit(fails)
    finally:
        threads.shutdown(wait=True)


async def test_a_call_whose_caller_gave_up_while_queued_is_never_started() -> None:
    threads = StoreThreads(1, "test")
    release = threading.Event()
    ran: list[str] = []
    try:
        busy = threads.submit(release.wait)  # holds the only thread
        queued = threads.submit(lambda: ran.append("queued"))
        queued.cancel()
        release.set()
        assert await busy is True
        assert await threads.submit(lambda: "after") == "after"  # the queue moved on past it
        assert ran == []
    finally:
        threads.shutdown(wait=True)


async def test_shutdown_cancels_what_is_queued_and_waits_for_what_runs() -> None:
    threads = StoreThreads(1, "test")
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def running() -> None:
        started.set()
        release.wait()
        done.append("running")

    first = threads.submit(running)
    queued = threads.submit(lambda: done.append("queued"))
    await asyncio.get_running_loop().run_in_executor(None, started.wait)
    threading.Timer(0.05, release.set).start()
    threads.shutdown(wait=True)
    assert done == ["running"]
    assert queued.cancelled()
    await asyncio.sleep(0.01)  # the running call's result arrives on the loop
    assert first.done()


def test_a_store_has_at_least_one_thread() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StoreThreads(0, "test")
