"""Rate-limit counters in MongoDB, so every replica enforces one shared limit.

Each window of each client is one document ``{_id: key, n: count, expires_at: date}``,
bumped by one atomic upsert (``find_one_and_update``); a TTL index on ``expires_at`` lets
MongoDB delete finished windows. Calls run in a thread pool of their own, like
MongoStore's, with a short client-side timeout: the rate limiter fails open on
StoreUnavailable, so a slow database must cost a request little time.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError

from vault.stores.base import StoreUnavailable
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
        self._mongo = MongoConnection(uri, pool_size=pool_size, timeout=timeout)
        self._counts: Collection[dict[str, Any]] = self._mongo.client[database][collection]
        self._index_ready = False
        self._index_retry_at = 0.0

    async def open(self) -> None:
        """Start the thread pool and, if the database answers, create the TTL index."""
        await self._mongo.open()
        await self._ensure_index()

    async def close(self) -> None:
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

    def _increment_sync(self, key: str, expires_at: dt.datetime) -> int:
        bump = {"$inc": {"n": 1}}
        # One time budget for both attempts.
        with pymongo.timeout(self._mongo.timeout):
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

    async def increment(self, key: str, expires_at: float) -> int:
        """Add one to ``key``'s count and return it; StoreUnavailable if MongoDB fails."""
        when = dt.datetime.fromtimestamp(expires_at, dt.UTC)
        count: int = await self._run("rate_limit_increment", self._increment_sync, key, when)
        # The first success after a failed open() shows the database is back: try the
        # index again now, then at most once a minute while it keeps failing.
        if not self._index_ready and time.monotonic() >= self._index_retry_at:
            self._index_retry_at = time.monotonic() + INDEX_RETRY_SECONDS
            await self._ensure_index()
        return count
