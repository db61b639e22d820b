"""A store's own threads: every blocking store call runs in one of them, never on the loop.

A fixed set of long-lived threads takes calls from one queue and hands each result back with
``loop.call_soon_threadsafe``. The event loop's ``run_in_executor`` does the same through a
ThreadPoolExecutor and a concurrent future chained to an asyncio one, with their locks:
measured on a call that does nothing, 36 µs of CPU and 46 µs of wall time per call against
19 µs and 25 µs here, paid on every request at one connection.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

T = TypeVar("T")

# One call: what to run, the future its caller awaits, and the loop that future belongs to.
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _resolve(future: asyncio.Future[T], result: T) -> None:
    if not future.done():  # the caller may have given up meanwhile
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class StoreThreads:
    """``threads`` threads (as many as the store has connections) running store calls.

    A call whose caller gave up while it was still queued is never started (as an executor
    cancels a queued future); one already running is left to finish, its result dropped.
    """

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Daemons: a thread stuck in a hung database call must not hold the process's exit
        # (the driver's own timeout ends it); closing the store waits for the running calls.
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{k}", daemon=True)
            for k in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, func: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``func``; the future is resolved on this loop with its result or error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((func, future, loop))
        return future

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            func, future, loop = job
            if future.done():  # given up while queued: never sent
                continue
            try:
                result = func()
            except BaseException as exc:
                self._hand_back(loop, _fail, future, exc)
            else:
                self._hand_back(loop, _resolve, future, result)

    @staticmethod
    def _hand_back(
        loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any
    ) -> None:
        with suppress(RuntimeError):  # the loop closed meanwhile: no one is waiting
            loop.call_soon_threadsafe(callback, *args)

    def shutdown(self, *, wait: bool) -> None:
        """Cancel the calls still queued and end the threads once their running calls
        return; ``wait`` for that (blocking) or not."""
        with suppress(queue.Empty):
            while True:
                job = self._queue.get_nowait()
                if job is not None:
                    job[1].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
