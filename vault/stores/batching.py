"""Group commit for store calls: concurrent single-record calls become one database call.

Each request still waits for its own record, and is answered only once the call that carried
it returned (an insert is acknowledged only when the batch holding it is durable). While
a call of one kind is running, new records queue; when it returns, the queue goes out as the
next batch (two calls in flight were measured slower: smaller, dearer batches). An idle
service therefore sends each record at once, with no timer adding latency, and a busy one
sends fewer, larger calls: the CPU a call costs (about 250 µs of pymongo work and a thread
hand-off) is shared by every record in it.

A record that finds nothing running and nothing queued is sent by its own caller, in its own
task: a batch of one needs no task, no future and no second budget of its own, which at one
connection was a fifth of the event loop's time per request. Records arriving meanwhile
queue behind it as behind any call.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from observability.metrics import STORE_BATCH_SIZE
from observability.tracing import BATCH_CONTEXTS
from vault.breaker import CircuitBreaker
from vault.errors import StoreKnownDown, StoreUnavailable

T = TypeVar("T")
Item = TypeVar("Item")
Result = TypeVar("Result")

# One call's worth: a batch of maximum-size secrets stays well under MongoDB's 48 MB message.
MAX_BATCH = 256


class Batcher(Generic[Item, Result]):
    """Runs ``call(items)`` on batches of submitted items; see the module docstring.

    ``call`` returns one entry per item, in order: the item's result, or the exception that
    item alone failed with. An exception raised by ``call`` itself fails the whole batch.
    A caller waits at most ``timeout`` seconds, time queued behind a running call included,
    then gets StoreUnavailable: a hung database answers 503 in one budget, not two. While
    the store's ``breaker`` is open, submissions fail with StoreKnownDown at once instead of
    queueing: between probes, and during a probe too, since a record queued behind the probe
    would wait for it (seconds, against a database that does not answer).
    """

    def __init__(
        self,
        call: Callable[[list[Item]], Awaitable[Sequence[Result | Exception]]],
        *,
        operation: str,
        timeout: float | None = None,
        max_batch: int = MAX_BATCH,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self._call = call
        self._breaker = breaker
        self._timeout = timeout
        self._max_batch = max_batch
        self._size = STORE_BATCH_SIZE.labels(operation)
        self._pending: list[tuple[Item, asyncio.Future[Result], contextvars.Context]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._inline = 0  # calls running in their caller's task (``_send_alone``)
        self._inline_done: asyncio.Future[None] | None = None  # what ``close`` waits on

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and return its result once the call that carried it returned."""
        self._check_open()
        if not self._in_flight and not self._pending:
            return await self._send_alone(item)
        future = self._enqueue(item)
        self._kick()
        result: Result = await self._within_budget(future)
        return result

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue several items at once (they go out in the same call) and return their
        results in order; the first item's failure, if any, is raised."""
        self._check_open()
        futures = [self._enqueue(item) for item in items]
        self._kick()
        results: list[Result] = await self._within_budget(asyncio.gather(*futures))
        return results

    def _check_open(self) -> None:
        breaker = self._breaker
        if breaker is None or not breaker.is_open:
            return
        # Known down: refused between probes; and while a call is running (the probe, or
        # one that will fail), since queueing behind it would mean waiting for it.
        if breaker.refuses_now() or self._in_flight:
            raise StoreKnownDown("the store is known to be down; not tried")

    def _enqueue(self, item: Item) -> asyncio.Future[Result]:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future, contextvars.copy_context()))
        return future

    def _kick(self) -> None:
        if not self._in_flight:
            self._launch()

    async def _within_budget(self, waiter: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter
        except TimeoutError:
            # Not sent yet: it never will be. Sent: its call may still land, unacknowledged.
            raise StoreUnavailable.after(self._timeout) from None

    async def _send_alone(self, item: Item) -> Result:
        """Send ``item`` alone from its caller's task (nothing is running or queued): the
        call is this request's child with no links, as the first of a batch would be."""
        self._in_flight += 1
        self._inline += 1
        self._size.observe(1)
        token = BATCH_CONTEXTS.set((contextvars.copy_context(),))
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._call([item])
        except TimeoutError:
            raise StoreUnavailable.after(self._timeout) from None
        finally:
            BATCH_CONTEXTS.reset(token)
            self._in_flight -= 1
            self._inline -= 1
            if not self._inline and self._inline_done is not None:
                self._inline_done.set_result(None)
                self._inline_done = None
            if self._pending and not self._in_flight:
                self._launch()
        if len(results) != 1:  # pragma: no cover - a store bug, not an input
            raise RuntimeError("a batch call returned the wrong number of results")
        result = results[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _launch(self) -> None:
        # Requests that gave up while queued (their client went away) are not sent.
        self._pending = [entry for entry in self._pending if not entry[1].done()]
        if not self._pending:
            return
        batch = self._pending[: self._max_batch]
        del self._pending[: len(batch)]
        self._in_flight += 1
        # The call runs in the context of the batch's first request, so its span (when
        # tracing) is that request's child, and it links the others (BATCH_CONTEXTS).
        task = asyncio.create_task(self._run(batch), context=batch[0][2])
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, batch: list[tuple[Item, asyncio.Future[Result], contextvars.Context]]
    ) -> None:
        self._size.observe(len(batch))
        BATCH_CONTEXTS.set(tuple(context for _, _, context in batch))
        try:
            results = await self._call([item for item, _, _ in batch])
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:  # every waiter fails as the call did; the caller maps it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            if len(results) != len(batch):  # pragma: no cover - a store bug, not an input
                results = [RuntimeError("a batch call returned the wrong number of results")]
                results *= len(batch)
            for (_, future, _), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            if self._pending and not self._in_flight:
                self._launch()

    async def close(self) -> None:
        """Wait for the calls already running (their records were promised an answer)."""
        while self._tasks or self._inline:
            if self._inline:
                if self._inline_done is None:
                    self._inline_done = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._inline_done)
            await asyncio.gather(*self._tasks, return_exceptions=True)
