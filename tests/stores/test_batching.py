"""Group commit: concurrent calls share one store call, and each caller gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from vault.breaker import CircuitBreaker
from vault.errors import StoreKnownDown, StoreUnavailable
from vault.stores.batching import Batcher

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch call that remembers each batch it was given and takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_concurrent_calls_share_batches_and_each_gets_its_own_result() -> None:
    call = Recorder()
    batcher = Batcher(call, operation="test")
    results = await asyncio.gather(
        *(batcher.submit(i) for i in range(0, 100, 2)), return_exceptions=True
    )
    assert results == [i * 10 for i in range(0, 100, 2)]
    assert sorted(i for batch in call.batches for i in batch) == list(range(0, 100, 2))
    # The first goes out alone at once; the rest gather while it runs and go out together.
    assert call.batches == [[0], list(range(2, 100, 2))]


async def test_an_idle_service_sends_each_call_at_once() -> None:
    call = Recorder(delay=0)
    batcher = Batcher(call, operation="test")
    for i in (2, 4, 6):
        assert await batcher.submit(i) == i * 10
    assert call.batches == [[2], [4], [6]]


async def test_an_item_that_fails_alone_fails_only_its_own_caller() -> None:
    batcher = Batcher(Recorder(), operation="test")
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    assert [r for r in results if not isinstance(r, Exception)] == [0, 20, 40]
    assert [str(r) for r in results if isinstance(r, Exception)] == ["odd 1", "odd 3", "odd 5"]


async def test_a_failed_call_fails_its_batch_and_the_next_batch_goes_out() -> None:
    calls = 0

    async def flaky(items: list[int]) -> list[int | Exception]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise ConnectionError("store down")
        return list(items)

    batcher = Batcher(flaky, operation="test")
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)  # the first batch is out; these queue behind it
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    with pytest.raises(ConnectionError):
        await first
    assert await asyncio.gather(*rest) == [2, 3]
    assert calls == 2


async def test_a_caller_that_gave_up_while_queued_is_not_sent() -> None:
    call = Recorder()
    batcher = Batcher(call, operation="test")
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)
    abandoned = asyncio.ensure_future(batcher.submit(2))
    kept = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0)
    abandoned.cancel()
    assert await first == 0
    assert await kept == 40
    assert call.batches == [[0], [4]]


async def test_batches_are_capped_and_one_runs_at_a_time() -> None:
    call = Recorder()
    batcher = Batcher(call, operation="test", max_batch=4)
    await asyncio.gather(*(batcher.submit(i) for i in range(0, 40, 2)))
    assert max(len(batch) for batch in call.batches) == 4
    assert call.batches[:2] == [[0], [2, 4, 6, 8]]  # the rest queued behind the first call


async def test_close_waits_for_the_calls_already_running() -> None:
    call = Recorder(delay=0.05)
    batcher = Batcher(call, operation="test")
    pending = asyncio.ensure_future(batcher.submit(8))
    await asyncio.sleep(0)
    await batcher.close()
    assert pending.done()
    assert pending.result() == 80


async def test_a_caller_queued_behind_a_hung_call_gives_up_within_its_own_budget() -> None:
    started = asyncio.Event()

    async def hangs(items: list[int]) -> list[int | Exception]:
        started.set()
        await asyncio.sleep(1.0)
        return list(items)

    batcher = Batcher(hangs, operation="test", timeout=0.3)
    first = asyncio.ensure_future(batcher.submit(1))
    await started.wait()
    loop = asyncio.get_running_loop()
    queued_at = loop.time()
    with pytest.raises(StoreUnavailable):
        await batcher.submit(2)  # behind the hung call: never sent
    assert loop.time() - queued_at < 0.8  # its own budget, not the end of the hung call (1 s)
    with pytest.raises(StoreUnavailable):
        await first
    await batcher.close()


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(Recorder(), operation="test", max_batch=0)
    with pytest.raises(ValueError, match="positive"):
        Batcher(Recorder(), operation="test", timeout=0)


async def test_while_the_store_is_known_down_submissions_fail_at_once_and_queue_nothing() -> None:
    # A slow call is running (the breaker's probe): a record queued behind it would wait.
    call = Recorder(delay=1.0)
    breaker = CircuitBreaker(retry_after=0.0)
    batcher = Batcher(call, operation="test", breaker=breaker)
    running = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.05)
    # The store was found down meanwhile, and no probe is due (retry_after 0 would allow
    # one): the running call alone decides; nothing queues behind it.
    ticket = breaker.try_call()
    assert ticket is not None
    breaker.failed(ticket)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StoreKnownDown):
        await batcher.submit(4)
    with pytest.raises(StoreKnownDown):
        await batcher.submit_many([6, 8])
    assert loop.time() - started < 0.5
    assert await running == 20
    assert call.batches == [[2]]  # the refused ones were never sent
    # Nothing running and the probe due: this one goes out, and its success closes it.
    assert await batcher.submit(10) == 100
    breaker.succeeded(breaker.try_call() or pytest.fail("a probe is due"))
    assert not breaker.is_open


async def test_an_idle_call_runs_in_its_callers_task_and_later_ones_queue_behind_it() -> None:
    tasks: list[asyncio.Task[object] | None] = []

    async def call(items: list[int]) -> list[int | Exception]:
        tasks.append(asyncio.current_task())
        await asyncio.sleep(0.02)
        return list(items)

    batcher = Batcher(call, operation="test")

    async def caller() -> tuple[int, asyncio.Task[object] | None]:
        return await batcher.submit(1), asyncio.current_task()

    first = asyncio.ensure_future(caller())
    await asyncio.sleep(0)  # the first call is out, from the first caller's own task
    rest = await asyncio.gather(batcher.submit(2), batcher.submit(3))
    result, own_task = await first
    assert (result, rest) == (1, [2, 3])
    assert tasks[0] is own_task  # no task of its own: sent by its caller
    assert len(tasks) == 2 and tasks[1] is not own_task  # the two queued went out together


async def test_a_caller_that_gives_up_on_its_call_does_not_strand_those_queued_behind_it() -> None:
    call = Recorder(delay=0.05)
    batcher = Batcher(call, operation="test")
    first = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0)
    first.cancel()
    assert await queued == 40
    assert call.batches == [[2], [4]]
    await batcher.close()
