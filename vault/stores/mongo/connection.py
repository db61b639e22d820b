"""A pymongo client whose every call runs in a thread pool as large as its own pool, with
the circuit breaker that answers at once while the database is known down."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pymongo
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from observability.metrics import STORE_BREAKER_OPEN, STORE_BREAKER_OPENED, STORE_SHORT_CIRCUITED
from vault.breaker import Call, CircuitBreaker
from vault.errors import StoreKnownDown, StoreUnavailable
from vault.stores.base import run_off_loop
from vault.stores.mongo.errors import (
    is_down,
    is_unavailable,
    mapped_unavailable,
)
from vault.stores.threads import StoreThreads

CLOSE_TIMEOUT_SECONDS = 2.0


# While the database is known down, one request tries it again this often (the others are
# answered 503 at once): short, so that service resumes well within a second of its return.
BREAKER_RETRY_SECONDS = 0.2
log = logging.getLogger("secret_manager.store")


def store_breaker(store: str) -> CircuitBreaker:
    """The breaker of one database connection, reported as ``store`` in the metrics."""
    is_open = STORE_BREAKER_OPEN.labels(store)
    opened = STORE_BREAKER_OPENED.labels(store)
    refused = STORE_SHORT_CIRCUITED.labels(store)
    is_open.set(0)

    def on_open() -> None:
        is_open.set(1)
        opened.inc()
        log.warning(
            "store %s is down; answering 503 at once, one request trying it every %g s",
            store,
            BREAKER_RETRY_SECONDS,
        )

    def on_close() -> None:
        is_open.set(0)
        log.warning("store %s answers again", store)

    return CircuitBreaker(
        retry_after=BREAKER_RETRY_SECONDS,
        on_open=on_open,
        on_close=on_close,
        on_refused=refused.inc,
    )


class MongoConnection:
    """A pymongo client whose every call runs in a thread pool as large as its own pool.

    Shared by the secret store and the rate-limit counters; ``run`` turns errors that mean
    "not reachable or not writable now" into StoreUnavailable and lets the rest through.
    Its ``breaker`` opens on a connection-level failure: calls then raise StoreUnavailable at
    once, without a thread hand-off, while one probe at a time tries the database.
    """

    def __init__(self, uri: str, *, pool_size: int, timeout: float, store: str = "secrets") -> None:
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.timeout = timeout
        self._pool_size = pool_size
        # The driver times out first; the outer deadline only catches a stuck thread.
        self._deadline = timeout + 1.0
        self.client: MongoClient[dict[str, Any]] = MongoClient(
            uri,
            timeoutMS=int(timeout * 1000),
            maxPoolSize=pool_size,
            retryWrites=True,
            retryReads=True,
            appname="secret-manager",
            tz_aware=True,
            connect=False,
        )
        self._threads: StoreThreads | None = None
        self.breaker = store_breaker(store)

    async def open(self) -> None:
        self._threads = StoreThreads(self._pool_size, "mongo")

    def _close_sync(self) -> None:
        # close() ends the client's server sessions, selecting a server for that under
        # serverSelectionTimeoutMS (30 s), not timeoutMS: with the database down it would
        # hold a shutdown past any graceful timeout. Ending sessions is best effort anyway.
        with pymongo.timeout(min(self.timeout, CLOSE_TIMEOUT_SECONDS)):
            self.client.close()

    async def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)
        await asyncio.get_running_loop().run_in_executor(None, self._close_sync)

    async def run(
        self, operation: str, func: Any, *args: object, timeout: float | None = None
    ) -> Any:
        """Run ``func(*args)`` in the pool; ``timeout`` replaces the store's budget for calls
        that wrap themselves in a longer ``pymongo.timeout``."""
        if self._threads is None:
            raise RuntimeError("MongoDB used before open()")
        call = self.breaker.try_call()
        if call is None:
            raise StoreKnownDown("the database is known to be down; not tried")
        try:
            result = await run_off_loop(
                func,
                *args,
                threads=self._threads,
                timeout=self._deadline if timeout is None else timeout + 1.0,
                operation=operation,
                system="mongodb",
            )
        except PyMongoError as exc:
            self._judge(call, exc)
            if is_unavailable(exc):
                raise mapped_unavailable(exc) from None
            raise
        except StoreUnavailable:  # the outer deadline: the driver did not end the call
            self.breaker.failed(call)
            raise
        except BaseException:  # cancelled, or not the database's doing
            self.breaker.abandoned(call)
            raise
        self.breaker.succeeded(call)
        return result

    def _judge(self, call: Call, exc: PyMongoError) -> None:
        if is_down(exc):
            self.breaker.failed(call)
        else:  # the database answered, if only to refuse: it is up
            self.breaker.succeeded(call)
