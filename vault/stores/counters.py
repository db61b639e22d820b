"""Rate-limit counters in MongoDB, so every replica enforces one shared limit.

Each window of each client is one document ``{_id: key, n: count, expires_at: date}``,
bumped by one atomic upsert (``find_one_and_update``); a TTL index on ``expires_at`` lets
MongoDB delete finished windows. Calls run in a thread pool of their own, like
MongoStore's, with a short client-side timeout: the rate limiter fails open on
StoreUnavailable, so a slow database must cost a request little time.

Concurrent requests share calls (group commit, as for secrets): one thread hand-off per
batch, and one atomic ``$inc`` by n per key in it. Behind a proxy or Swarm's routing mesh
most requests share a key, so a batch is usually one or two upserts whatever its size; the
n requests of a key get the n counts that one increment covered, in the order they came.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError

from vault.errors import StoreUnavailable
from vault.stores.batching import Batcher
from vault.stores.mongo import MongoConnection

log = logging.getLogger("secret_manager.ratelimit")

INDEX_RETRY_SECONDS = 60.0


class MongoCounter:
    """One counter document per key in ``database.collection``; see the module docstring."""

    def __init__(
        self,
        uri: str,
        *,
        database: str = "vault",
        collection: str = "rate_limits",
        timeout: float = 2.0,
        pool_size: int = 16,
    ) -> None:
        self._mongo = MongoConnection(uri, pool_size=pool_size, timeout=timeout, store="rate_limit")
        self._counts: Collection[dict[str, Any]] = self._mongo.client[database][collection]
        self._index_ready = False
        self._index_retry_at = 0.0
        self._increments = Batcher(
            self._increment_batch,
            operation="rate_limit_increment",
            timeout=timeout + 1.0,
            breaker=self._mongo.breaker,
        )

    async def open(self) -> None:
        """Start the thread pool and, if the database answers, create the TTL index."""
        await self._mongo.open()
        await self._ensure_index()

    async def close(self) -> None:
        await self._increments.close()
        await self._mongo.close()

    async def _run(self, operation: str, func: Any, *args: object) -> Any:
        try:
            return await self._mongo.run(operation, func, *args)
        except PyMongoError as exc:
            # The type only: a DuplicateKeyError's message quotes the key, a client address.
            raise StoreUnavailable(f"rate limit counter: {type(exc).__name__}") from None

    async def _ensure_index(self) -> None:
        """Best effort: the database may be down at start; increment() tries again later."""
        try:
            await self._run("rate_limit_index", self._create_index_sync)
        except StoreUnavailable as exc:
            log.warning("TTL index on rate limit counters not created yet (%s); will retry", exc)
            return
        self._index_ready = True

    def _create_index_sync(self) -> None:
        # expireAfterSeconds=0: each document goes once its own expires_at has passed.
        self._counts.create_index("expires_at", expireAfterSeconds=0)

    def _increment_many_sync(self, items: list[tuple[str, dt.datetime]]) -> list[int | Exception]:
        """Count a batch: one ``$inc`` per distinct key; each item gets its own count."""
        positions: dict[str, list[int]] = {}
        for index, (key, _) in enumerate(items):
            positions.setdefault(key, []).append(index)
        counts: list[int | Exception] = [0] * len(items)
        # One time budget for the whole batch.
        with pymongo.timeout(self._mongo.timeout):
            for key, indexes in positions.items():
                try:
                    total = self._increment_sync(key, items[indexes[0]][1], len(indexes))
                except StoreUnavailable as exc:
                    for index in indexes:
                        counts[index] = exc
                    continue
                for offset, index in enumerate(indexes):
                    counts[index] = total - len(indexes) + 1 + offset
        return counts

    def _increment_sync(self, key: str, expires_at: dt.datetime, by: int) -> int:
        bump = {"$inc": {"n": by}}
        try:
            # An upsert seeds the new document from the filter's equality fields, so a
            # window's document is born with its expiry in the same atomic write. (Not
            # $setOnInsert: nx-27017's findAndModify drops it, and stores dates given to
            # $set or $max as strings, which a TTL index ignores.)
            doc = self._counts.find_one_and_update(
                {"_id": key, "expires_at": expires_at},
                bump,
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            doc = None  # nx-27017 answers a failed upsert with no document instead
        if doc is None:
            # Another replica inserted this key first (or with another expiry): it
            # exists now, so bump it without an upsert that could create a second one.
            doc = self._counts.find_one_and_update(
                {"_id": key}, bump, return_document=ReturnDocument.AFTER
            )
        if doc is None:  # expired and deleted between the two attempts: rare, fail open
            raise StoreUnavailable("rate limit counter: key vanished while counting")
        return int(doc["n"])

    async def _increment_batch(self, items: list[tuple[str, dt.datetime]]) -> list[int | Exception]:
        counts: list[int | Exception] = await self._run(
            "rate_limit_increment", self._increment_many_sync, items
        )
        return counts

    async def increment(self, key: str, expires_at: float) -> int:
        """Add one to ``key``'s count and return it; StoreUnavailable if MongoDB fails."""
        return (await self.increment_many([(key, expires_at)]))[0]

    async def increment_many(self, keys: Sequence[tuple[str, float]]) -> list[int]:
        """``increment`` for each key, in the same batch; StoreUnavailable if MongoDB fails."""
        items = [(key, dt.datetime.fromtimestamp(at, dt.UTC)) for key, at in keys]
        counts = await self._increments.submit_many(items)
        # The first success after a failed open() shows the database is back: try the
        # index again now, then at most once a minute while it keeps failing.
        if not self._index_ready and time.monotonic() >= self._index_retry_at:
            self._index_retry_at = time.monotonic() + INDEX_RETRY_SECONDS
            await self._ensure_index()
        return counts
