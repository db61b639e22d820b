"""MongoDB store through pymongo, every call in a dedicated thread pool.

The pool has as many threads as pymongo's connection pool has connections, so a thread
never waits for a pooled connection, and it is separate from anyio's default thread
limiter (40 threads) so other thread work cannot starve the store. Timeouts are client-side
operation timeouts (``timeoutMS``): server selection, connection checkout and retries all
fit in one budget, so a client gets a 503 within seconds when the database is gone instead
of pymongo's 30 s.

The package holds, as the SQLite store's does under the same names: ``store.py`` (the
serving store), ``bulk.py`` (export, import and their whole-store reads and writes),
``documents.py`` (a record and an audit record as stored), ``connection.py`` (the client,
its thread pool and breaker) and ``errors.py`` (pymongo's errors mapped onto
vault.errors).
"""

from __future__ import annotations

import urllib.parse
import warnings
from dataclasses import dataclass

from pymongo import MongoClient
from pymongo.errors import ConfigurationError

from vault.errors import ConfigError
from vault.stores.base import BulkStore, SecretStore
from vault.stores.mongo.bulk import MongoBulk
from vault.stores.mongo.connection import MongoConnection
from vault.stores.mongo.store import MongoStore

__all__ = ["MongoBackend", "MongoBulk", "MongoConnection", "MongoStore"]


@dataclass(frozen=True)
class MongoBackend:
    """A MongoDB database, MONGO_DB at MONGO_URI (``Backend`` of vault/stores/base.py)."""

    uri: str
    database: str
    write_concern: str | int
    journal: bool
    pool_size: int
    timeout: float
    max_secret_bytes: int
    kind: str = "mongodb"
    # The lifecycle events its serving store writes (Settings.emitted_events).
    events: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return f"MongoDB database {self.database!r}"

    def check_writable(self, *, create: bool) -> None:
        """Nothing to make: the database makes what it needs on the first write."""

    def check(self) -> None:
        """Parse the URI the way pymongo will, without connecting; never echo its password."""
        try:
            with warnings.catch_warnings():
                # pymongo only warns about an unknown option; a typo should stop start-up.
                warnings.simplefilter("error")
                MongoClient(self.uri, connect=False).close()
        except (ConfigurationError, UserWarning) as exc:
            message = str(exc)
            try:
                password = urllib.parse.urlsplit(self.uri).password
            except ValueError:
                password = None
            if password:
                message = message.replace(password, "***")
            raise ConfigError(
                f"MONGO_URI is not a usable MongoDB connection string: {message}"
            ) from None

    def exists(self) -> bool:
        return True  # a database that does not exist yet is an empty one: asking makes nothing

    def open(self) -> SecretStore:
        return MongoStore(
            self.uri,
            self.database,
            write_concern=self.write_concern,
            journal=self.journal,
            pool_size=self.pool_size,
            timeout=self.timeout,
            max_secret_bytes=self.max_secret_bytes,
            events=self.events,
        )

    def open_bulk(self, *, create: bool) -> BulkStore:
        return MongoBulk(
            self.uri,
            self.database,
            write_concern=self.write_concern,
            journal=self.journal,
            timeout=self.timeout,
        )
