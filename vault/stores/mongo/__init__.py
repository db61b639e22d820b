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

from vault.stores.mongo.bulk import MongoBulk
from vault.stores.mongo.connection import MongoConnection
from vault.stores.mongo.store import MongoStore

__all__ = ["MongoBulk", "MongoConnection", "MongoStore"]
